//! slurmrestd's side: the few requests the source makes (ping, the job list, submit,
//! signal, cancel) and the shapes it reads. Plain HTTP/1.1 through hyper-util's client.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::config::{Endpoint, SlurmConfig};
use crate::error::SlurmError;

/// The most bytes of an answer that are read: the job list of a busy cluster is large, but
/// bounded.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// One job of slurmrestd's list, as far as the source reads it.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Job {
    pub job_id: u64,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub job_state: String,
    /// The batch script's wait status (`code << 8 | signal`).
    #[serde(default)]
    pub exit_code: Option<i64>,
    #[serde(default)]
    pub start_time: Option<i64>,
    #[serde(default)]
    pub end_time: Option<i64>,
    #[serde(default)]
    pub state_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    errors: Vec<WireError>,
}

#[derive(Deserialize)]
struct JobsAnswer {
    #[serde(default)]
    jobs: Vec<Job>,
}

#[derive(Deserialize)]
struct SubmitAnswer {
    job_id: Option<u64>,
}

/// The client of one runtime's slurmrestd.
pub(crate) struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    endpoint: Endpoint,
    version: String,
    user: String,
    token: Mutex<String>,
    timeout: Duration,
}

impl Api {
    pub(crate) fn new(config: &SlurmConfig, endpoint: Endpoint, token: String) -> Api {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.request_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(8)
            .build(connector);
        Api {
            client,
            endpoint,
            version: config.api_version.clone(),
            user: config.user.clone(),
            token: Mutex::new(token),
            timeout: config.request_timeout,
        }
    }

    /// Takes a token read again (after a refusal).
    pub(crate) fn set_token(&self, token: String) {
        *self.token.lock().unwrap_or_else(|e| e.into_inner()) = token;
    }

    fn path(&self, rest: &str) -> String {
        format!("{}/slurm/{}/{rest}", self.endpoint.prefix, self.version)
    }

    /// Sends one request and reads its whole answer within `request_timeout`: the status
    /// and the body.
    async fn send(
        &self,
        what: &'static str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), SlurmError> {
        let token = self.token.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.endpoint.authority))
            .header(header::HOST, &self.endpoint.authority)
            .header(header::ACCEPT, "application/json")
            .header("X-SLURM-USER-NAME", &self.user)
            .header("X-SLURM-USER-TOKEN", token);
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| SlurmError::Bad {
                what,
                detail: format!("building the request: {e}"),
            })?;
        let work = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| SlurmError::Unreachable {
                    what,
                    detail: chain(&e),
                })?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| SlurmError::Unreachable {
                    what,
                    detail: format!("reading the answer: {e}"),
                })?
                .to_bytes();
            Ok((status, bytes))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(SlurmError::Timeout { what }),
        }
    }

    /// A request whose success answer is JSON of shape `T`; an error answer becomes the
    /// [`SlurmError`] it says.
    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        what: &'static str,
        method: Method,
        rest: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, SlurmError> {
        let (status, bytes) = self.send(what, method, &self.path(rest), body).await?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(SlurmError::Unauthorized {
                what,
                status: status.as_u16(),
            });
        }
        if status == StatusCode::NOT_FOUND && what == "ping" {
            return Err(SlurmError::VersionNotServed {
                what,
                served: self.served_versions().await,
            });
        }
        let errors = serde_json::from_slice::<Answer>(&bytes)
            .map(|a| {
                a.errors
                    .into_iter()
                    .filter_map(|e| e.error.or(e.description))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if !status.is_success() || !errors.is_empty() {
            return Err(SlurmError::Slurm {
                what,
                status: status.as_u16(),
                errors,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| SlurmError::Bad {
            what,
            detail: format!("the answer does not read: {e}"),
        })
    }

    /// The API versions the cluster serves, from its OpenAPI document (empty when it
    /// cannot be read).
    async fn served_versions(&self) -> Vec<String> {
        for path in ["/openapi/v3", "/openapi"] {
            let path = format!("{}{path}", self.endpoint.prefix);
            let Ok((status, bytes)) = self.send("openapi", Method::GET, &path, None).await else {
                continue;
            };
            if !status.is_success() {
                continue;
            }
            #[derive(Deserialize)]
            struct Doc {
                #[serde(default)]
                paths: serde_json::Map<String, serde_json::Value>,
            }
            let Ok(doc) = serde_json::from_slice::<Doc>(&bytes) else {
                continue;
            };
            let mut served: Vec<String> = doc
                .paths
                .keys()
                .filter_map(|p| p.strip_prefix("/slurm/")?.strip_suffix("/ping"))
                .map(str::to_string)
                .collect();
            served.sort();
            served.dedup();
            return served;
        }
        Vec::new()
    }

    /// Whether the cluster serves the configured version and its controller answers.
    pub(crate) async fn ping(&self) -> Result<(), SlurmError> {
        let _: serde_json::Value = self.call("ping", Method::GET, "ping", None).await?;
        Ok(())
    }

    /// Every job the controller holds (pending, running, and ended within `MinJobAge`).
    pub(crate) async fn jobs(&self) -> Result<Vec<Job>, SlurmError> {
        let answer: JobsAnswer = self.call("jobs", Method::GET, "jobs", None).await?;
        Ok(answer.jobs)
    }

    /// Submits a batch job; its id.
    pub(crate) async fn submit(&self, body: &serde_json::Value) -> Result<u64, SlurmError> {
        let body = serde_json::to_vec(body).expect("a JSON value serializes");
        let answer: SubmitAnswer = self
            .call("submit", Method::POST, "job/submit", Some(body))
            .await?;
        answer.job_id.ok_or(SlurmError::Bad {
            what: "submit",
            detail: "the answer holds no job_id".into(),
        })
    }

    /// Sends `signal` to every process of a running job (`SIGTERM`), or cancels the job
    /// with `None` (Slurm's cancel: SIGTERM, then SIGKILL after the cluster's `KillWait`).
    pub(crate) async fn kill(&self, job_id: &str, signal: Option<&str>) -> Result<(), SlurmError> {
        let rest = match signal {
            Some(s) => format!("job/{job_id}?signal={s}"),
            None => format!("job/{job_id}"),
        };
        let _: serde_json::Value = self
            .call(
                if signal.is_some() { "signal" } else { "cancel" },
                Method::DELETE,
                &rest,
                None,
            )
            .await?;
        Ok(())
    }
}

/// An error and its sources, for the log.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        text.push_str(": ");
        text.push_str(&e.to_string());
        next = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_of_the_list_reads_with_the_fields_it_needs() {
        let job: Job = serde_json::from_str(
            r#"{"job_id": 7, "name": "roster-x", "job_state": "FAILED", "exit_code": 768,
                "start_time": 1, "end_time": 2, "state_reason": "NonZeroExitCode",
                "nodes": "n1", "extra": {"a": 1}}"#,
        )
        .unwrap();
        assert_eq!((job.job_id, job.exit_code), (7, Some(768)));
        assert_eq!(job.job_state, "FAILED");
    }
}
