//! The engine's side: what a worker's container is made of, what its labels record, and what
//! an inspection says. Pure data and mapping; the calls are in `source.rs`.

use std::collections::{BTreeMap, HashMap};

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, HostConfig};
use registry_core::{FailReason, WorkerState};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The label every container of a `docker` runtime carries: the runtime's name.
pub(crate) const LABEL_RUNTIME: &str = "roster.runtime";
/// The label that says which registry's runtime made a container: a random id kept in the
/// runtime's state directory, so a restarted `roster` finds its containers again and two
/// registries on one engine never take each other's.
pub(crate) const LABEL_INSTANCE: &str = "roster.instance";
/// The label holding what the client asked for ([`Meta`] as JSON).
pub(crate) const LABEL_WORKER: &str = "roster.worker";

/// What a worker's labels record: enough to show it again after a restart of `roster`.
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
    /// A hash of the spawn request, to answer a repeated `request_id` after a restart.
    pub request_hash: Option<String>,
    pub retention: u64,
    pub grace_ms: u64,
    /// Made fresh for each spawn: tells the spawn that made a container from a list that
    /// shows it before the spawn has recorded it.
    pub nonce: String,
}

/// What a worker runs, resolved from its profile (or command) and the request.
#[derive(Clone)]
pub(crate) struct Plan {
    pub image: String,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub network: String,
    pub memory: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub user: Option<String>,
}

impl Plan {
    /// The profile's labels and the source's own: the runtime, the instance, the worker.
    fn labels_for(&self, runtime: &str, instance: &str, meta: &Meta) -> HashMap<String, String> {
        let mut labels: HashMap<String, String> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.insert(LABEL_RUNTIME.into(), runtime.into());
        labels.insert(LABEL_INSTANCE.into(), instance.into());
        labels.insert(
            LABEL_WORKER.into(),
            serde_json::to_string(meta).expect("meta serializes"),
        );
        labels
    }

    /// The body of the engine's create call.
    pub(crate) fn create_body(
        &self,
        runtime: &str,
        instance: &str,
        meta: &Meta,
    ) -> ContainerCreateBody {
        let labels = self.labels_for(runtime, instance, meta);
        ContainerCreateBody {
            image: Some(self.image.clone()),
            // The argv replaces the image's entrypoint and command both.
            entrypoint: Some(self.argv[..1].to_vec()),
            cmd: Some(self.argv[1..].to_vec()),
            env: Some(self.env.clone()),
            working_dir: self.cwd.clone(),
            user: self.user.clone(),
            labels: Some(labels),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(false),
            tty: Some(false),
            host_config: Some(HostConfig {
                network_mode: Some(self.network.clone()),
                memory: self.memory.map(|m| m.min(i64::MAX as u64) as i64),
                // No swap beyond the memory limit, so a limit is a limit.
                memory_swap: self.memory.map(|m| m.min(i64::MAX as u64) as i64),
                nano_cpus: self.cpus.map(|c| (c * 1e9) as i64),
                pids_limit: self.pids_limit,
                // A small init as PID 1 passes SIGTERM on to the command (PID 1 of a
                // container ignores signals it has no handler for) and reaps orphans.
                init: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl Plan {
    /// The spec of a swarm service that runs this plan as one task, never restarted:
    /// `restart_policy: none`, one replica, stopped with `grace` (SIGTERM, then SIGKILL).
    /// The network `none` is no network at all (a task with none has only its loopback).
    pub(crate) fn service_spec(
        &self,
        runtime: &str,
        instance: &str,
        meta: &Meta,
        grace: std::time::Duration,
    ) -> bollard::models::ServiceSpec {
        use bollard::models::{
            Limit, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
            ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecResources,
            TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
        };
        let labels = self.labels_for(runtime, instance, meta);
        let networks = (self.network != "none").then(|| {
            vec![NetworkAttachmentConfig {
                target: Some(self.network.clone()),
                ..Default::default()
            }]
        });
        ServiceSpec {
            labels: Some(labels.clone()),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.image.clone()),
                    labels: Some(labels),
                    // The argv replaces the image's entrypoint and command both.
                    command: Some(self.argv[..1].to_vec()),
                    args: Some(self.argv[1..].to_vec()),
                    env: Some(self.env.clone()),
                    dir: self.cwd.clone(),
                    user: self.user.clone(),
                    init: Some(true),
                    stop_signal: Some("SIGTERM".into()),
                    stop_grace_period: Some(grace.as_nanos().min(i64::MAX as u128) as i64),
                    ..Default::default()
                }),
                resources: Some(TaskSpecResources {
                    limits: Some(Limit {
                        nano_cpus: self.cpus.map(|c| (c * 1e9) as i64),
                        memory_bytes: self.memory.map(|m| m.min(i64::MAX as u64) as i64),
                        pids: self.pids_limit,
                    }),
                    ..Default::default()
                }),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                    max_attempts: Some(0),
                    ..Default::default()
                }),
                networks,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The engine's view of a container, as far as a worker's state goes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Facts {
    pub phase: Phase,
    pub exit_code: i64,
    pub oom_killed: bool,
    /// Start failed (the engine's error text: for the log only).
    pub start_error: Option<String>,
    pub started_at: Option<OffsetDateTime>,
    pub finished_at: Option<OffsetDateTime>,
    pub labels: HashMap<String, String>,
}

/// Where a container is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Created, never started.
    Created,
    /// Running (paused and restarting count as running).
    Running,
    /// Exited or dead.
    Ended,
}

impl Facts {
    pub(crate) fn from_inspect(c: &ContainerInspectResponse) -> Facts {
        use bollard::models::ContainerStateStatusEnum as S;
        let state = c.state.clone().unwrap_or_default();
        let phase = match state.status {
            Some(S::CREATED) | None | Some(S::EMPTY) => Phase::Created,
            Some(S::RUNNING) | Some(S::PAUSED) | Some(S::RESTARTING) => Phase::Running,
            Some(S::STOPPING) => Phase::Running,
            Some(S::REMOVING) | Some(S::EXITED) | Some(S::DEAD) => Phase::Ended,
        };
        // A container whose start failed stays `created` with the error set; Podman shows
        // it `exited` (or `stopped`) with the error. Either way it never ran.
        let start_error = state.error.filter(|e| !e.is_empty());
        Facts {
            phase,
            exit_code: state.exit_code.unwrap_or(0),
            oom_killed: state.oom_killed.unwrap_or(false),
            start_error,
            started_at: state.started_at.as_deref().and_then(parse_time),
            finished_at: state.finished_at.as_deref().and_then(parse_time),
            labels: c
                .config
                .as_ref()
                .and_then(|c| c.labels.clone())
                .unwrap_or_default(),
        }
    }
}

impl Facts {
    /// A swarm task's facts, as a container's: a task that was refused or never got a
    /// container (no such image on the node, …) never started; one whose node left the
    /// swarm (`orphaned`) is `None`: the worker is lost.
    pub(crate) fn from_task(task: &bollard::models::Task) -> Option<Facts> {
        use bollard::models::TaskState as T;
        let status = task.status.clone().unwrap_or_default();
        let state = status.state.unwrap_or(T::NEW);
        let phase = match state {
            T::RUNNING => Phase::Running,
            T::COMPLETE | T::SHUTDOWN | T::FAILED | T::REJECTED | T::REMOVE => Phase::Ended,
            T::ORPHANED => return None,
            _ => Phase::Created,
        };
        let container = status.container_status.unwrap_or_default();
        let ran =
            container.container_id.is_some_and(|c| !c.is_empty()) && !matches!(state, T::REJECTED);
        let at = status
            .timestamp
            .as_ref()
            .and_then(|t| parse_time(&t.to_string()));
        let start_error = (!ran && phase == Phase::Ended)
            .then(|| status.err.unwrap_or_else(|| "the task never ran".into()));
        Some(Facts {
            phase,
            exit_code: container.exit_code.unwrap_or(0),
            oom_killed: false,
            start_error,
            started_at: (phase == Phase::Running).then_some(at).flatten(),
            finished_at: (phase == Phase::Ended).then_some(at).flatten(),
            labels: HashMap::new(),
        })
    }
}

/// An engine time stamp; `None` for the zero time the engine shows for "never".
pub(crate) fn parse_time(text: &str) -> Option<OffsetDateTime> {
    let t = OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    (t.year() > 1970).then_some(t)
}

/// How a worker ended, from the container's exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct End {
    pub state: WorkerState,
    pub exit_code: Option<i32>,
    pub reason: Option<FailReason>,
}

/// Maps a container's end to the worker's terminal state.
///
/// - A stop was asked for: `stopped` (with the code when the command exited by itself
///   with one below 128).
/// - The kernel's OOM killer ended it: `failed`, `killed`, with the code (137).
/// - A code from 129 to 192 is a death by signal 1 to 64 (the init passes the
///   command's on, as a shell does): `failed`, `killed`.
/// - Otherwise `exited` with the code.
/// - A container that never started (`start_error`): `failed`, `spawn_failed`.
pub(crate) fn end_of(facts: &Facts, stop_requested: bool) -> End {
    let code = facts.exit_code.clamp(i32::MIN as i64, i32::MAX as i64) as i32;
    if facts.start_error.is_some() && facts.started_at.is_none() {
        return End {
            state: WorkerState::Failed,
            exit_code: None,
            reason: Some(FailReason::SpawnFailed),
        };
    }
    if stop_requested {
        return End {
            state: WorkerState::Stopped,
            exit_code: (0..128).contains(&code).then_some(code),
            reason: None,
        };
    }
    if facts.oom_killed {
        return End {
            state: WorkerState::Failed,
            exit_code: Some(code),
            reason: Some(FailReason::Killed),
        };
    }
    if (129..=192).contains(&code) {
        return End {
            state: WorkerState::Failed,
            exit_code: None,
            reason: Some(FailReason::Killed),
        };
    }
    End {
        state: WorkerState::Exited,
        exit_code: Some(code),
        reason: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(code: i64, oom: bool) -> Facts {
        Facts {
            phase: Phase::Ended,
            exit_code: code,
            oom_killed: oom,
            start_error: None,
            started_at: Some(OffsetDateTime::now_utc()),
            finished_at: None,
            labels: HashMap::new(),
        }
    }

    #[test]
    fn exits_map_to_exited_stopped_or_failed() {
        assert_eq!(end_of(&facts(3, false), false).state, WorkerState::Exited);
        assert_eq!(end_of(&facts(3, false), false).exit_code, Some(3));
        let killed = end_of(&facts(137, false), false);
        assert_eq!(
            (killed.state, killed.reason),
            (WorkerState::Failed, Some(FailReason::Killed))
        );
        let oom = end_of(&facts(137, true), false);
        assert_eq!(
            (oom.state, oom.reason, oom.exit_code),
            (WorkerState::Failed, Some(FailReason::Killed), Some(137))
        );
        let stopped = end_of(&facts(143, false), true);
        assert_eq!(
            (stopped.state, stopped.exit_code),
            (WorkerState::Stopped, None)
        );
        let never = Facts {
            start_error: Some("exec: not found".into()),
            started_at: None,
            ..facts(127, false)
        };
        assert_eq!(end_of(&never, false).reason, Some(FailReason::SpawnFailed));
    }

    #[test]
    fn swarm_tasks_map_as_containers_do() {
        let task = |state: &str, container: bool, code: i64| -> bollard::models::Task {
            let status = if container {
                serde_json::json!({"State": state, "Timestamp": "2026-12-03T14:28:44.6Z",
                    "ContainerStatus": {"ContainerID": "c0ffee", "ExitCode": code}})
            } else {
                serde_json::json!({"State": state, "Err": "No such image"})
            };
            serde_json::from_value(serde_json::json!({"ServiceID": "s", "Status": status})).unwrap()
        };
        let running = Facts::from_task(&task("running", true, 0)).unwrap();
        assert_eq!(running.phase, Phase::Running);
        assert!(running.started_at.is_some());
        let done = Facts::from_task(&task("failed", true, 3)).unwrap();
        assert_eq!(end_of(&done, false).exit_code, Some(3));
        assert_eq!(end_of(&done, false).state, WorkerState::Exited);
        let refused = Facts::from_task(&task("rejected", false, 0)).unwrap();
        assert_eq!(
            end_of(&refused, false).reason,
            Some(FailReason::SpawnFailed)
        );
        assert_eq!(
            Facts::from_task(&task("pending", false, 0)).unwrap().phase,
            Phase::Created
        );
        assert!(Facts::from_task(&task("orphaned", true, 0)).is_none());
    }

    #[test]
    fn a_swarm_service_is_one_replica_never_restarted() {
        let plan = Plan {
            image: "i".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "true".into()],
            env: vec![],
            cwd: None,
            labels: BTreeMap::new(),
            network: "none".into(),
            memory: Some(1 << 20),
            cpus: None,
            pids_limit: Some(8),
            user: None,
        };
        let meta = Meta {
            name: None,
            labels: BTreeMap::new(),
            profile: None,
            args: vec![],
            command: None,
            created_at: OffsetDateTime::now_utc(),
            request_id: None,
            request_hash: None,
            retention: 1,
            grace_ms: 1,
            nonce: "n".into(),
        };
        let spec = plan.service_spec("r", "inst", &meta, std::time::Duration::from_secs(2));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["Mode"]["Replicated"]["Replicas"], 1);
        assert_eq!(json["TaskTemplate"]["RestartPolicy"]["Condition"], "none");
        assert_eq!(
            json["TaskTemplate"]["ContainerSpec"]["Command"][0],
            "/bin/sh"
        );
        assert_eq!(
            json["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"],
            2_000_000_000i64
        );
        assert_eq!(json["TaskTemplate"]["Resources"]["Limits"]["Pids"], 8);
        assert!(
            json["TaskTemplate"]["Networks"].is_null(),
            "none: no network at all"
        );
        assert_eq!(json["Labels"]["roster.instance"], "inst");
    }

    #[test]
    fn the_engines_zero_time_is_none() {
        assert_eq!(parse_time("0001-01-01T00:00:00Z"), None);
        assert!(parse_time("2026-12-03T14:28:44.604415639Z").is_some());
    }
}
