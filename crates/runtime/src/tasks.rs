//! Workspace tasks: the environment's commands that run on start (devcontainer
//! `postCreateCommand` once, `postStartCommand` and Hocus's `tasks[].workspace` every time),
//! each in a persistent terminal whose output is kept and that developers can attach to.
//!
//! A task supervisor (`warren runtime tasks`, one per workspace start, detached like the shim,
//! so an agent restart does not end anyone's dev server) runs the tasks through
//! [`Runtime::exec`] with a terminal each. For every task it keeps, in the workspace's task
//! folder:
//! - `<name>.log`: everything the terminal printed, across starts (capped, see [`LOG_LIMIT`]);
//! - `<name>.state`: running, or how it ended;
//! - `<name>.sock` while it runs: connect to attach (bytes in, bytes out); disconnect to detach.
//!
//! Tasks run in groups: the once-only tasks (first start) before the every-start ones, and by
//! stage within each; a group starts when every task of the one before has ended.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use warren_protocol::TaskSpec;

use crate::{Error, ExecIo, ExecRequest, ExitStatus, Runtime, WinSize, WorkspaceId};

/// How a task is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum TaskState {
    Waiting,
    Running,
    Exited {
        status: ExitStatus,
    },
    /// It could not be started (the message says why).
    Failed {
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub name: String,
    #[serde(flatten)]
    pub state: TaskState,
    /// Bytes in its log.
    pub log_bytes: u64,
}

/// Bytes of a log, from an offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    pub data: Vec<u8>,
    /// Where the next read continues.
    pub next_offset: u64,
    /// Whether more may come (the task runs, or waits to).
    pub running: bool,
}

/// Past this many bytes a log keeps only its newest half.
pub const LOG_LIMIT: u64 = 32 << 20;
/// What an attaching terminal is shown of the past first.
const REPLAY: u64 = 8 << 10;
const TASKS_FILE: &str = "tasks.json";
const FIRST_START_DONE: &str = "first-start.done";
const SUPERVISOR_LOCK: &str = "supervisor.lock";

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

fn state_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.state"))
}
fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.log"))
}
fn socket_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

fn write_state(dir: &Path, name: &str, state: &TaskState) {
    let tmp = dir.join(format!("{name}.state.tmp"));
    let ok = serde_json::to_vec(state)
        .ok()
        .is_some_and(|bytes| std::fs::write(&tmp, bytes).is_ok());
    if ok {
        let _ = std::fs::rename(&tmp, state_path(dir, name));
    }
}

fn read_state(dir: &Path, name: &str) -> Option<TaskState> {
    serde_json::from_slice(&std::fs::read(state_path(dir, name)).ok()?).ok()
}

/// Writes the tasks of a start for the supervisor; checks their names.
pub fn save_tasks(dir: &Path, tasks: &[TaskSpec]) -> Result<(), Error> {
    for t in tasks {
        if !valid_name(&t.name) {
            return Err(Error::InvalidConfig(format!(
                "task name `{}`: 1 to 64 of a-z, A-Z, 0-9, - _ and ., not starting with .",
                t.name
            )));
        }
        if t.argv.is_empty() {
            return Err(Error::InvalidConfig(format!(
                "task `{}` has no command",
                t.name
            )));
        }
    }
    std::fs::create_dir_all(dir).map_err(Error::io("cannot create", dir))?;
    let path = dir.join(TASKS_FILE);
    let tmp = dir.join(format!("{TASKS_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(tasks).map_err(Error::encode("the task list"))?;
    std::fs::write(&tmp, bytes).map_err(Error::io("cannot write", &tmp))?;
    std::fs::rename(&tmp, &path).map_err(Error::io("cannot write", &path))
}

fn load_tasks(dir: &Path) -> Vec<TaskSpec> {
    std::fs::read(dir.join(TASKS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The tasks of the workspace's latest start and how each is doing.
pub fn list(dir: &Path) -> Vec<TaskInfo> {
    load_tasks(dir)
        .into_iter()
        .map(|t| TaskInfo {
            state: read_state(dir, &t.name).unwrap_or(TaskState::Waiting),
            log_bytes: std::fs::metadata(log_path(dir, &t.name))
                .map(|m| m.len())
                .unwrap_or(0),
            name: t.name,
        })
        .collect()
}

/// Up to `max` bytes of a task's log from `offset`.
pub fn read_log(dir: &Path, name: &str, offset: u64, max: usize) -> Result<LogChunk, Error> {
    let known = load_tasks(dir).iter().any(|t| t.name == name);
    if !known || !valid_name(name) {
        return Err(Error::NoTask(name.to_owned()));
    }
    let running = matches!(
        read_state(dir, name),
        None | Some(TaskState::Running | TaskState::Waiting)
    ) && supervisor_running(dir);
    let path = log_path(dir, name);
    let mut file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(LogChunk {
                data: Vec::new(),
                next_offset: 0,
                running,
            });
        }
        Err(e) => return Err(Error::io("cannot open", &path)(e)),
    };
    let len = file
        .metadata()
        .map_err(Error::io("cannot read", &path))?
        .len();
    // A log that was cut (see LOG_LIMIT) restarts readers that were past its end.
    let offset = if offset > len { 0 } else { offset };
    file.seek(SeekFrom::Start(offset))
        .map_err(Error::io("cannot read", &path))?;
    let mut data = Vec::new();
    file.take(max as u64)
        .read_to_end(&mut data)
        .map_err(Error::io("cannot read", &path))?;
    Ok(LogChunk {
        next_offset: offset + data.len() as u64,
        data,
        running,
    })
}

/// Attaches to a running task's terminal: what it prints arrives on the stream (the recent
/// past first), what is written goes to it. Closing the stream detaches.
pub fn attach(dir: &Path, name: &str) -> Result<UnixStream, Error> {
    if !valid_name(name) || !load_tasks(dir).iter().any(|t| t.name == name) {
        return Err(Error::NoTask(name.to_owned()));
    }
    UnixStream::connect(socket_path(dir, name)).map_err(|_| Error::TaskNotRunning(name.into()))
}

fn supervisor_running(dir: &Path) -> bool {
    let Ok(file) = File::options().write(true).open(dir.join(SUPERVISOR_LOCK)) else {
        return false;
    };
    match file.try_lock() {
        Ok(()) => false,
        Err(_) => true,
    }
}

/// Runs the saved tasks of `id` to their end (the body of `warren runtime tasks`). Returns
/// without running anything if another supervisor still runs them after 10 s.
pub fn supervise(runtime: &dyn Runtime, id: &WorkspaceId, dir: &Path) -> Result<(), Error> {
    let lock_path = dir.join(SUPERVISOR_LOCK);
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io("cannot open", &lock_path))?;
    // The supervisor of the start before may still be seeing its tasks end (a stop ends them
    // moments before): wait a little for it. One still there after that runs this start's
    // tasks already.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while lock.try_lock().is_err() {
        if std::time::Instant::now() > deadline {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut tasks = load_tasks(dir);
    let first_start = !dir.join(FIRST_START_DONE).exists();
    if !first_start {
        tasks.retain(|t| !t.once);
    }
    for t in &tasks {
        write_state(dir, &t.name, &TaskState::Waiting);
    }
    // Once-only tasks first, then by stage.
    tasks.sort_by_key(|t| (!t.once, t.stage));
    let mut groups: Vec<Vec<TaskSpec>> = Vec::new();
    for t in tasks {
        match groups.last_mut() {
            Some(g) if g[0].once == t.once && g[0].stage == t.stage => g.push(t),
            _ => groups.push(vec![t]),
        }
    }
    for group in groups {
        let once = group[0].once;
        std::thread::scope(|s| {
            for task in &group {
                s.spawn(|| run_one(runtime, id, dir, task));
            }
        });
        if once {
            let _ = std::fs::write(dir.join(FIRST_START_DONE), b"");
        }
    }
    drop(lock);
    Ok(())
}

/// The attached terminals of one task.
type Attached = Arc<Mutex<Vec<UnixStream>>>;

fn run_one(runtime: &dyn Runtime, id: &WorkspaceId, dir: &Path, task: &TaskSpec) {
    let state =
        run_to_end(runtime, id, dir, task).unwrap_or_else(|error| TaskState::Failed { error });
    write_state(dir, &task.name, &state);
}

/// Runs one task in a terminal until it ends; how it ended.
fn run_to_end(
    runtime: &dyn Runtime,
    id: &WorkspaceId,
    dir: &Path,
    task: &TaskSpec,
) -> Result<TaskState, String> {
    let name = task.name.as_str();
    let mut log = File::options()
        .create(true)
        .append(true)
        .open(log_path(dir, name))
        .map_err(|e| e.to_string())?;
    let request = ExecRequest {
        argv: task.argv.clone(),
        env: task.env.clone(),
        cwd: task.cwd.clone(),
        land_in: None,
        user: task.user.clone(),
        tty: Some(WinSize {
            rows: 40,
            cols: 120,
        }),
        no_network: false,
    };
    let exec = runtime.exec(id, &request).map_err(|e| {
        let _ = writeln!(log, "warren: task `{name}` could not start: {e}\r");
        e.to_string()
    })?;
    let ExecIo::Pty { master } = exec.io else {
        return Err("no terminal".into());
    };
    write_state(dir, name, &TaskState::Running);
    let sock = socket_path(dir, name);
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).ok();
    let attached: Attached = Arc::default();
    let input = master.try_clone().ok().map(|m| Arc::new(Mutex::new(m)));
    if let (Some(listener), Some(input)) = (listener.as_ref(), input.as_ref()) {
        let listener = listener.try_clone().ok();
        let attached = attached.clone();
        let input = input.clone();
        let log_file = log_path(dir, name);
        std::thread::spawn(move || {
            for conn in listener.iter().flat_map(|l| l.incoming()) {
                let Ok(mut conn) = conn else { break };
                let _ = conn.set_write_timeout(Some(Duration::from_secs(2)));
                let _ = conn.write_all(&tail(&log_file, REPLAY));
                if let Ok(reader) = conn.try_clone() {
                    let input = input.clone();
                    std::thread::spawn(move || copy_input(reader, &input));
                }
                if let Ok(mut a) = attached.lock() {
                    a.push(conn);
                }
            }
        });
    }
    // The terminal's output, until it reads EIO (the last process holding it is gone).
    let mut master = master;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        append_log(&mut log, dir, name, &buf[..n]);
        if let Ok(mut a) = attached.lock() {
            a.retain_mut(|c| c.write_all(&buf[..n]).is_ok());
        }
    }
    let status = exec.process.wait();
    let _ = std::fs::remove_file(&sock);
    if let Ok(mut a) = attached.lock() {
        for c in a.drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
    let status = status.map_err(|e| e.to_string())?;
    let _ = writeln!(
        log,
        "\r\nwarren: task `{name}` ended ({})\r",
        match status {
            ExitStatus::Code(c) => format!("exit {c}"),
            ExitStatus::Signal(s) => format!("signal {s}"),
        }
    );
    Ok(TaskState::Exited { status })
}

fn copy_input(mut from: UnixStream, to: &Mutex<File>) {
    let mut buf = [0u8; 4096];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let Ok(mut master) = to.lock() else { return };
                if master.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Appends to a task's log; past [`LOG_LIMIT`] the log keeps its newest half.
fn append_log(log: &mut File, dir: &Path, name: &str, bytes: &[u8]) {
    let _ = log.write_all(bytes);
    let len = log.metadata().map(|m| m.len()).unwrap_or(0);
    if len <= LOG_LIMIT {
        return;
    }
    let path = log_path(dir, name);
    let kept = tail(&path, LOG_LIMIT / 2);
    let tmp = dir.join(format!("{name}.log.tmp"));
    if std::fs::write(&tmp, &kept).is_ok()
        && std::fs::rename(&tmp, &path).is_ok()
        && let Ok(f) = File::options().append(true).open(&path)
    {
        *log = f;
    }
}

/// The last `n` bytes of a file.
fn tail(path: &Path, n: u64) -> Vec<u8> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(n)));
    let mut out = Vec::new();
    let _ = f.take(n).read_to_end(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(name: &str) -> TaskSpec {
        TaskSpec {
            name: name.into(),
            argv: vec!["true".into()],
            env: vec![],
            user: None,
            cwd: None,
            once: false,
            stage: 0,
        }
    }

    #[test]
    fn task_names_are_checked_before_anything_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(save_tasks(dir.path(), &[task("web-server")]).is_ok());
        for bad in ["", "../x", ".hidden", "a b", &"x".repeat(65)] {
            assert!(save_tasks(dir.path(), &[task(bad)]).is_err(), "{bad:?}");
        }
        let mut empty = task("empty");
        empty.argv.clear();
        assert!(save_tasks(dir.path(), &[empty]).is_err());
    }

    #[test]
    fn logs_are_read_from_an_offset_and_unknown_tasks_refused() {
        let dir = tempfile::tempdir().unwrap();
        save_tasks(dir.path(), &[task("build")]).unwrap();
        std::fs::write(log_path(dir.path(), "build"), b"hello world").unwrap();
        write_state(
            dir.path(),
            "build",
            &TaskState::Exited {
                status: ExitStatus::Code(0),
            },
        );
        let chunk = read_log(dir.path(), "build", 6, 100).unwrap();
        assert_eq!(chunk.data, b"world");
        assert_eq!(chunk.next_offset, 11);
        assert!(!chunk.running);
        // A reader past the end of a log that was cut starts again.
        assert_eq!(
            read_log(dir.path(), "build", 500, 5).unwrap().data,
            b"hello"
        );
        assert!(matches!(
            read_log(dir.path(), "other", 0, 10),
            Err(Error::NoTask(_))
        ));
        let listed = list(dir.path());
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].log_bytes, 11);
    }

    #[test]
    fn a_log_past_its_limit_keeps_its_newest_half() {
        let dir = tempfile::tempdir().unwrap();
        let path = log_path(dir.path(), "t");
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let block = vec![b'a'; (LOG_LIMIT as usize) + 10];
        append_log(&mut log, dir.path(), "t", &block);
        append_log(&mut log, dir.path(), "t", b"END");
        let len = std::fs::metadata(&path).unwrap().len();
        assert_eq!(len, LOG_LIMIT / 2 + 3);
        assert!(tail(&path, 3) == b"END");
    }
}
