//! A worker as a Slurm batch job: what is submitted, what is kept about it in the state
//! directory, and how a job's state in the list maps to the worker's. Pure data and
//! mapping; the calls are in `source.rs`.

use std::collections::BTreeMap;
use std::path::Path;

use registry_core::{FailReason, WorkerState};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::api::Job;

/// What a worker's record file in the state directory holds: what the client asked for,
/// to show it again after a restart of `roster`. Never the environment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub name: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub profile: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub command: Option<Vec<String>>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub request_id: Option<String>,
    pub request_hash: Option<String>,
    pub retention: u64,
    pub grace_ms: u64,
}

/// What a job runs: its batch script and its resources.
pub(crate) struct Plan {
    pub script: String,
    pub cwd: String,
    pub env: BTreeMap<String, String>,
    pub time_limit_min: Option<u64>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
}

/// A word of the shell, quoted so that the shell reads it back unchanged.
pub(crate) fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// The batch script that `exec`s `argv`.
pub(crate) fn command_script(argv: &[String]) -> String {
    let words: Vec<String> = argv.iter().map(|a| quote(a)).collect();
    format!("#!/bin/sh\nexec {}\n", words.join(" "))
}

/// The batch script of a profile's `script` with `args` as its positional parameters: a
/// `set --` line right after its `#!` line (`#!/bin/sh` when it has none).
///
/// (slurmrestd 22.05 takes a job's `argv` but then fails; the arguments go into the
/// script instead.)
pub(crate) fn script_with_args(script: &str, args: &[String]) -> String {
    let (shebang, body) = match script.strip_prefix("#!") {
        Some(_) => match script.split_once('\n') {
            Some((first, rest)) => (first.to_string(), rest),
            None => (script.to_string(), ""),
        },
        None => ("#!/bin/sh".to_string(), script),
    };
    let words: Vec<String> = args.iter().map(|a| quote(a)).collect();
    let set = if words.is_empty() {
        "set --".to_string()
    } else {
        format!("set -- {}", words.join(" "))
    };
    let newline = if body.ends_with('\n') { "" } else { "\n" };
    format!("{shebang}\n{set}\n{body}{newline}")
}

impl Plan {
    /// The body of slurmrestd's `job/submit`.
    pub(crate) fn submit_body(
        &self,
        job_name: &str,
        output_dir: &Path,
        partition: Option<&str>,
        account: Option<&str>,
    ) -> serde_json::Value {
        let (out, err) = output_files(output_dir, job_name);
        let mut job = serde_json::json!({
            "name": job_name,
            "current_working_directory": self.cwd,
            "environment": self.env,
            "standard_input": "/dev/null",
            "standard_output": out.to_string_lossy(),
            "standard_error": err.to_string_lossy(),
            // A requeued job would run its command again under the same worker.
            "requeue": false,
        });
        let fields = job.as_object_mut().expect("an object");
        if let Some(p) = partition {
            fields.insert("partition".into(), p.into());
        }
        if let Some(a) = account {
            fields.insert("account".into(), a.into());
        }
        if let Some(t) = self.time_limit_min {
            fields.insert("time_limit".into(), t.into());
        }
        if let Some(c) = self.cpus {
            fields.insert("cpus_per_task".into(), c.into());
        }
        if let Some(m) = self.memory_mib {
            fields.insert("memory_per_node".into(), m.into());
        }
        serde_json::json!({ "script": self.script, "job": job })
    }
}

/// A job's stdout and stderr files.
pub(crate) fn output_files(
    output_dir: &Path,
    job_name: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    (
        output_dir.join(format!("{job_name}.out")),
        output_dir.join(format!("{job_name}.err")),
    )
}

/// Where a job is in its life, from its `job_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for resources, being configured or requeued.
    Pending,
    /// Running (also suspended, or completing: its processes are ending).
    Running,
    /// Over: the state names how.
    Ended,
}

/// The phase of a `job_state` (a base state, perhaps with flags after it).
pub(crate) fn phase(job_state: &str) -> Phase {
    let base = job_state.split([',', ' ']).next().unwrap_or("");
    match base {
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" => Phase::Pending,
        "COMPLETED" | "FAILED" | "CANCELLED" | "TIMEOUT" | "OUT_OF_MEMORY" | "NODE_FAIL"
        | "BOOT_FAIL" | "DEADLINE" | "PREEMPTED" => Phase::Ended,
        // RUNNING, SUSPENDED, COMPLETING, STAGE_OUT, SIGNALING, RESIZING, STOPPED, and
        // any state of a later Slurm.
        _ => Phase::Running,
    }
}

/// How a worker ended, from its job's end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct End {
    pub state: WorkerState,
    pub exit_code: Option<i32>,
    pub reason: Option<FailReason>,
    pub message: Option<String>,
    pub ended_at: Option<OffsetDateTime>,
}

/// Maps an ended job to the worker's terminal state.
///
/// - A stop was asked for: `stopped` (with the exit code if the script exited by itself
///   with one).
/// - `COMPLETED`: `exited` 0. `FAILED`: `exited` with the script's code, or `failed`,
///   `killed` when a signal ended it (Slurm then says `JobLaunchFailure` too); a job
///   Slurm could not launch is `spawn_failed`.
/// - `CANCELLED` (scancel from outside), `TIMEOUT`, `OUT_OF_MEMORY`, `DEADLINE`,
///   `PREEMPTED`: `failed`, `killed`, with a message saying which.
/// - `NODE_FAIL`: `failed`, `lost`; `BOOT_FAIL`: `failed`, `spawn_failed`.
pub(crate) fn end_of(job: &Job, stop_requested: bool) -> End {
    let status = job.exit_code.unwrap_or(0);
    let signal = (status & 0x7f) as i32;
    let code = ((status >> 8) & 0xff) as i32;
    let ended_at = job.end_time.filter(|t| *t > 0).and_then(unix);
    let end = |state, exit_code, reason, message: Option<&str>| End {
        state,
        exit_code,
        reason,
        message: message.map(str::to_string),
        ended_at,
    };
    if stop_requested {
        let by_itself = signal == 0 && job.job_state.starts_with("COMPLETED")
            || signal == 0 && job.job_state.starts_with("FAILED") && code != 0;
        return end(WorkerState::Stopped, by_itself.then_some(code), None, None);
    }
    let base = job.job_state.split([',', ' ']).next().unwrap_or("");
    let killed = Some(FailReason::Killed);
    match base {
        "COMPLETED" => end(WorkerState::Exited, Some(code), None, None),
        "FAILED" if signal != 0 => end(
            WorkerState::Failed,
            None,
            killed,
            Some("a signal nobody asked roster for ended the job"),
        ),
        "FAILED" if job.state_reason.as_deref() == Some("JobLaunchFailure") => end(
            WorkerState::Failed,
            None,
            Some(FailReason::SpawnFailed),
            Some("Slurm could not launch the job (its working directory or output files?)"),
        ),
        "FAILED" => end(WorkerState::Exited, Some(code), None, None),
        "CANCELLED" => end(
            WorkerState::Failed,
            None,
            killed,
            Some("the job was cancelled in Slurm, not through roster"),
        ),
        "TIMEOUT" => end(
            WorkerState::Failed,
            None,
            killed,
            Some("the job ran over its time limit and Slurm ended it"),
        ),
        "OUT_OF_MEMORY" => end(
            WorkerState::Failed,
            None,
            killed,
            Some("the job ran out of memory and Slurm ended it"),
        ),
        "DEADLINE" => end(
            WorkerState::Failed,
            None,
            killed,
            Some("the job reached its deadline and Slurm ended it"),
        ),
        "PREEMPTED" => end(
            WorkerState::Failed,
            None,
            killed,
            Some("the job was preempted by Slurm"),
        ),
        "NODE_FAIL" => end(
            WorkerState::Failed,
            None,
            Some(FailReason::Lost),
            Some("the node of the job failed"),
        ),
        "BOOT_FAIL" => end(
            WorkerState::Failed,
            None,
            Some(FailReason::SpawnFailed),
            Some("the node of the job failed to boot"),
        ),
        _ => end(WorkerState::Exited, Some(code), None, None),
    }
}

/// A Unix time of Slurm's.
pub(crate) fn unix(seconds: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp(seconds).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, status: i64, reason: &str) -> Job {
        Job {
            job_id: 1,
            name: "x".into(),
            job_state: state.into(),
            exit_code: Some(status),
            start_time: Some(1),
            end_time: Some(2),
            state_reason: Some(reason.into()),
        }
    }

    #[test]
    fn job_states_map_to_worker_states_and_reasons() {
        let e = end_of(&job("COMPLETED", 0, "None"), false);
        assert_eq!((e.state, e.exit_code), (WorkerState::Exited, Some(0)));
        let e = end_of(&job("FAILED", 3 << 8, "NonZeroExitCode"), false);
        assert_eq!((e.state, e.exit_code), (WorkerState::Exited, Some(3)));
        let e = end_of(&job("FAILED", 9, "NonZeroExitCode"), false);
        assert_eq!(
            (e.state, e.reason),
            (WorkerState::Failed, Some(FailReason::Killed))
        );
        for state in ["CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"] {
            let e = end_of(&job(state, 15, "None"), false);
            assert_eq!(
                (e.state, e.reason),
                (WorkerState::Failed, Some(FailReason::Killed))
            );
            assert!(e.message.is_some());
        }
        let e = end_of(&job("NODE_FAIL", 0, "None"), false);
        assert_eq!(e.reason, Some(FailReason::Lost));
        let e = end_of(&job("FAILED", 0, "JobLaunchFailure"), false);
        assert_eq!(e.reason, Some(FailReason::SpawnFailed));
        // A script killed by a signal is also a "launch failure" to Slurm.
        let e = end_of(&job("FAILED", 9, "JobLaunchFailure"), false);
        assert_eq!(e.reason, Some(FailReason::Killed));
        let e = end_of(&job("CANCELLED", 15, "None"), true);
        assert_eq!((e.state, e.exit_code), (WorkerState::Stopped, None));
        let e = end_of(&job("FAILED", 7 << 8, "NonZeroExitCode"), true);
        assert_eq!((e.state, e.exit_code), (WorkerState::Stopped, Some(7)));
    }

    #[test]
    fn phases_of_job_states() {
        assert_eq!(phase("PENDING"), Phase::Pending);
        assert_eq!(phase("RUNNING"), Phase::Running);
        assert_eq!(phase("COMPLETING"), Phase::Running);
        assert_eq!(phase("CANCELLED"), Phase::Ended);
        assert_eq!(phase("SOMETHING_NEW"), Phase::Running);
    }

    #[test]
    fn scripts_quote_every_word() {
        let argv = vec!["/bin/sh".to_string(), "-c".into(), "echo 'hi' $X".into()];
        assert_eq!(
            command_script(&argv),
            "#!/bin/sh\nexec '/bin/sh' '-c' 'echo '\\''hi'\\'' $X'\n"
        );
        assert_eq!(
            script_with_args("#!/bin/bash\necho \"$1\"", &["a b".into()]),
            "#!/bin/bash\nset -- 'a b'\necho \"$1\"\n"
        );
        assert_eq!(script_with_args("make", &[]), "#!/bin/sh\nset --\nmake\n");
    }

    #[test]
    fn a_quoted_word_reads_back_in_a_real_shell() {
        let word = "it's $HOME `x` \"q\" \\ \n end";
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote(word)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), word);
    }
}
