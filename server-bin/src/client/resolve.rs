//! Naming a worker on the command line: by its id, by a unique prefix of its id, or by its
//! name (within a runtime with `-r`). A name that some worker has is taken as a name; only
//! when none has it is it tried as an id prefix. A name or prefix that matches several
//! workers is an error that lists them.

use registry_core::WorkerId;
use serde_json::Value;

use super::error::ClientError;
use super::format::worker_line;
use super::http::{query, segment, Api};

/// At most this many pages (of 1000 workers) are read to resolve a name.
const MAX_PAGES: usize = 1000;

/// Every worker matching the filters, all pages of them.
pub async fn list_all(
    api: &Api,
    runtime: Option<&str>,
    state: Option<&str>,
    labels: &[(String, String)],
) -> Result<Vec<Value>, ClientError> {
    let mut workers = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let label_pairs: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut pairs: Vec<(&str, &str)> = vec![("limit", "1000")];
        if let Some(r) = runtime {
            pairs.push(("runtime", r));
        }
        if let Some(s) = state {
            pairs.push(("state", s));
        }
        for l in &label_pairs {
            pairs.push(("label", l));
        }
        if let Some(p) = &page {
            pairs.push(("page", p));
        }
        let body = api.get(&format!("/v1/workers{}", query(pairs))).await?;
        if let Some(list) = body["workers"].as_array() {
            workers.extend(list.iter().cloned());
        }
        match body["next_page"].as_str() {
            Some(next) => page = Some(next.to_string()),
            None => break,
        }
    }
    Ok(workers)
}

/// The worker `given` names.
pub async fn worker(api: &Api, given: &str, runtime: Option<&str>) -> Result<Value, ClientError> {
    let upper = given.to_ascii_uppercase();
    let as_id = match upper.strip_prefix("W_") {
        Some(rest) => format!("w_{rest}"),
        None => upper.clone(),
    };
    if WorkerId::has_shape(&as_id) {
        let worker = api.get(&format!("/v1/workers/{}", segment(&as_id))).await?;
        if let Some(r) = runtime {
            if worker["runtime_id"].as_str() != Some(r) {
                return Err(ClientError::api(
                    "worker_not_found",
                    format!("worker {as_id} is not in runtime {r:?}"),
                ));
            }
        }
        return Ok(worker);
    }
    if let Some(r) = runtime {
        // A runtime that does not exist is said so, not "no such worker".
        api.get(&format!("/v1/runtimes/{}", segment(r))).await?;
    }
    let all = list_all(api, runtime, None, &[]).await?;
    let matches = pick(&all, given);
    match matches.len() {
        1 => Ok(matches[0].clone()),
        0 => Err(ClientError::api(
            "worker_not_found",
            match runtime {
                Some(r) => {
                    format!("no worker in runtime {r:?} has the id, id prefix or name {given:?}")
                }
                None => format!("no worker has the id, id prefix or name {given:?}"),
            },
        )),
        _ => {
            let now = time::OffsetDateTime::now_utc();
            Err(ClientError::Ambiguous {
                given: given.to_string(),
                candidates: matches.iter().map(|w| worker_line(w, now)).collect(),
            })
        }
    }
}

/// The workers whose name is `given`; when none has it, those whose id starts with it
/// (with or without `w_`, in any case).
fn pick<'a>(workers: &'a [Value], given: &str) -> Vec<&'a Value> {
    let by_name: Vec<&Value> = workers
        .iter()
        .filter(|w| w["name"].as_str() == Some(given))
        .collect();
    if !by_name.is_empty() {
        return by_name;
    }
    let upper = given.to_ascii_uppercase();
    let prefix = upper.strip_prefix("W_").unwrap_or(&upper);
    if prefix.is_empty() {
        return Vec::new();
    }
    workers
        .iter()
        .filter(|w| {
            w["id"]
                .as_str()
                .and_then(|id| id.strip_prefix("w_"))
                .is_some_and(|id| id.starts_with(prefix))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_and_id_prefixes_pick_workers() {
        let workers = vec![
            json!({"id": "w_ABC0000000000000000000000A", "name": "build"}),
            json!({"id": "w_ABD0000000000000000000000B", "name": "build"}),
            json!({"id": "w_XYZ0000000000000000000000C", "name": "abc"}),
        ];
        let ids = |given: &str| -> Vec<&str> {
            pick(&workers, given)
                .iter()
                .map(|w| w["id"].as_str().unwrap())
                .collect()
        };
        assert_eq!(ids("build").len(), 2);
        assert_eq!(ids("w_abc"), ["w_ABC0000000000000000000000A"]);
        assert_eq!(ids("XY"), ["w_XYZ0000000000000000000000C"]);
        // "abc" is the name of one worker and a prefix of another's id: the name wins.
        assert_eq!(ids("abc"), ["w_XYZ0000000000000000000000C"]);
        assert_eq!(ids("AB").len(), 2);
        assert!(ids("nothing").is_empty());
        assert!(ids("w_").is_empty());
    }
}
