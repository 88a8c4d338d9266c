//! The host's API: what the control plane asks of a workspace on this host — run a command to
//! its end, list its tasks, read a task's log, attach to a task's terminal. The control plane
//! calls it in process on its own host (`warren up`) and through the tunnel each `warren agent`
//! holds open to it (see [`crate::tunnel`]); either way the same requests and answers.
//!
//! Paths name the runtime's workspace id (`ws-<id>`); the control plane has already checked who
//! asks, and resolved the user and the environment a command runs with.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use warren_api::{
    ErrorBody, ExecRequest, ExecResponse, ExitStatus, LogQuery, LogView, TaskState, TaskView,
};
use warren_runtime::{Error as RuntimeError, Runtime, WorkspaceId, tasks};

/// Most output an exec returns per stream; the rest is cut (interactive work goes over SSH).
pub const EXEC_OUTPUT_LIMIT: u64 = 8 << 20;

/// Largest piece of a log one request returns.
const LOG_PIECE: usize = 256 << 10;

/// The routes, over this host's runtime.
pub fn router(runtime: Arc<dyn Runtime>) -> Router {
    Router::new()
        .route("/workspaces/{id}/exec", post(exec))
        .route("/workspaces/{id}/tasks", get(list_tasks))
        .route("/workspaces/{id}/tasks/{task}/log", get(task_log))
        .route("/workspaces/{id}/tasks/{task}/attach", post(attach))
        .route("/workspaces/{id}/ports/{port}/connect", post(connect_port))
        .route("/workspaces/{id}/connect", post(connect))
        .route("/workspaces/{id}/sessions", post(session))
        .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such host endpoint") })
        .with_state(runtime)
}

/// An answer the control plane passes on: its status and `{"error": ...}`.
#[derive(Debug)]
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Refusal {
    Refusal(status, message.into())
}

/// A runtime error as an answer: a workspace or task this host does not have is a 404.
fn runtime_error(e: RuntimeError) -> Refusal {
    match e {
        RuntimeError::NotFound(_) | RuntimeError::NoTask(_) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        other => refuse(StatusCode::UNPROCESSABLE_ENTITY, other.to_string()),
    }
}

/// Runs blocking runtime work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, RuntimeError> + Send + 'static,
) -> Result<T, Refusal> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(runtime_error)
}

/// A workspace's id: only `ws-...`, never a build's or a prebuild's sandbox (which hold other
/// projects' variables and caches), whoever asks.
fn workspace_id(id: &str) -> Result<WorkspaceId, Refusal> {
    if !id.starts_with("ws-") {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no workspace `{id}`"),
        ));
    }
    WorkspaceId::new(id).map_err(|e| refuse(StatusCode::BAD_REQUEST, e.to_string()))
}

type Runtimes = State<Arc<dyn Runtime>>;

async fn exec(
    State(runtime): Runtimes,
    Path(id): Path<String>,
    Json(req): Json<ExecRequest>,
) -> Result<Json<ExecResponse>, Refusal> {
    let id = workspace_id(&id)?;
    let request = warren_runtime::ExecRequest {
        argv: req.argv,
        env: req.env,
        cwd: req.cwd,
        land_in: req.land_in,
        user: req.user,
        tty: None,
        no_network: false,
    };
    let stdin = req.stdin.unwrap_or_default();
    let exec = blocking(move || runtime.exec(&id, &request)).await?;
    // A caller that goes away (or gives up) takes the command with it.
    let process: Arc<dyn warren_runtime::Process> = Arc::from(exec.process);
    let guard = KillOnDrop(Some(process.clone()));
    let io = exec.io;
    let answer = blocking(move || run_to_end(io, process.as_ref(), stdin)).await;
    guard.disarm();
    answer.map(Json)
}

/// Kills the process it holds when dropped, unless disarmed first.
struct KillOnDrop(Option<Arc<dyn warren_runtime::Process>>);

impl KillOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(process) = self.0.take() {
            // A shim call: off the async threads.
            tokio::task::spawn_blocking(move || process.signal(libc::SIGKILL));
        }
    }
}

async fn list_tasks(
    State(runtime): Runtimes,
    Path(id): Path<String>,
) -> Result<Json<Vec<TaskView>>, Refusal> {
    let id = workspace_id(&id)?;
    let listed = blocking(move || Ok(tasks::list(&runtime.tasks_dir(&id)?))).await?;
    Ok(Json(listed.into_iter().map(task_view).collect()))
}

async fn task_log(
    State(runtime): Runtimes,
    Path((id, task)): Path<(String, String)>,
    Query(query): Query<LogQuery>,
) -> Result<Json<LogView>, Refusal> {
    use base64::Engine as _;
    let id = workspace_id(&id)?;
    let chunk =
        blocking(move || tasks::read_log(&runtime.tasks_dir(&id)?, &task, query.offset, LOG_PIECE))
            .await?;
    Ok(Json(LogView {
        data_base64: base64::engine::general_purpose::STANDARD.encode(&chunk.data),
        next_offset: chunk.next_offset,
        running: chunk.running,
    }))
}

/// The task's terminal, both ways: the request's body is typed into it while the answer's
/// body carries its output, until either side ends (the task goes on: that is a detach).
async fn attach(
    State(runtime): Runtimes,
    Path((id, task)): Path<(String, String)>,
    body: Body,
) -> Result<Response, Refusal> {
    let id = workspace_id(&id)?;
    let stream = blocking(move || {
        let stream = tasks::attach(&runtime.tasks_dir(&id)?, &task)?;
        stream
            .set_nonblocking(true)
            .map_err(|cause| RuntimeError::Os {
                call: "O_NONBLOCK on a task's terminal",
                cause,
            })?;
        Ok(stream)
    })
    .await?;
    let stream = tokio::net::UnixStream::from_std(stream)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (from_task, to_task) = stream.into_split();
    Ok(both_ways(from_task, to_task, body))
}

/// A relayed SSH session (a shell, a command, sftp): the request's body carries the gateway's
/// frames, the answer's this host's ([`warren_protocol::relay`]).
async fn session(
    State(runtime): Runtimes,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, Refusal> {
    let id = workspace_id(&id)?;
    Ok(crate::relay::serve(runtime, id, body).await)
}

/// Longest a connection to a workspace's port may take to open.
const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Where a forwarded connection goes (`ssh -L`, `-D`).
#[derive(Debug, serde::Deserialize)]
struct ConnectTo {
    host: String,
    port: u16,
}

/// A TCP connection from inside the workspace to `host:port` (a name resolved by this host's
/// resolver, as the workspace's own lookups are), both ways.
async fn connect(
    State(runtime): Runtimes,
    Path(id): Path<String>,
    Query(to): Query<ConnectTo>,
    body: Body,
) -> Result<Response, Refusal> {
    let id = workspace_id(&id)?;
    let address = warren_protocol::gateway::forward_address(&to.host, to.port)
        .await
        .map_err(|e| refuse(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    connect_to(runtime, id, address, body).await
}

/// A TCP connection to `port` on the workspace's own loopback (what its preview URL shows),
/// both ways: the request's body is written to it, what it sends is the answer's body.
async fn connect_port(
    State(runtime): Runtimes,
    Path((id, port)): Path<(String, u16)>,
    body: Body,
) -> Result<Response, Refusal> {
    let id = workspace_id(&id)?;
    let to = std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port));
    connect_to(runtime, id, to, body).await
}

async fn connect_to(
    runtime: Arc<dyn Runtime>,
    id: WorkspaceId,
    to: std::net::SocketAddr,
    body: Body,
) -> Result<Response, Refusal> {
    let port = to.port();
    let connecting = blocking(move || {
        let stream = runtime.connect(&id, to)?;
        stream
            .set_nonblocking(true)
            .map_err(|cause| RuntimeError::Os {
                call: "O_NONBLOCK on a workspace's connection",
                cause,
            })?;
        Ok(stream)
    });
    let stream = tokio::time::timeout(CONNECT_WITHIN, connecting)
        .await
        .map_err(|_| {
            refuse(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "port {port} did not answer within {} s",
                    CONNECT_WITHIN.as_secs()
                ),
            )
        })??;
    let stream = tokio::net::TcpStream::from_std(stream)
        .map_err(|e| refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let (from, to) = stream.into_split();
    Ok(both_ways(from, to, body))
}

/// The answer whose body is what `from` yields, while the request's `body` is written to
/// `to`; when the caller stops sending (it left), the answer ends too.
fn both_ways(
    from: impl tokio::io::AsyncRead + Send + 'static,
    mut to: impl tokio::io::AsyncWrite + Send + Unpin + 'static,
    body: Body,
) -> Response {
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;
    let (left, leaving) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let mut body = body;
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data()
                && to.write_all(&data).await.is_err()
            {
                break;
            }
        }
        let _ = to.shutdown().await;
        drop(left);
    });
    let output = futures_util::StreamExt::take_until(
        tokio_util::io::ReaderStream::with_capacity(from, warren_protocol::tunnel::STREAM_BUFFER),
        leaving,
    );
    Body::from_stream(output).into_response()
}

/// A task as the API shows it.
fn task_view(info: tasks::TaskInfo) -> TaskView {
    TaskView {
        name: info.name,
        state: match info.state {
            tasks::TaskState::Waiting => TaskState::Waiting,
            tasks::TaskState::Running => TaskState::Running,
            tasks::TaskState::Exited { status } => TaskState::Exited {
                status: match status {
                    warren_runtime::ExitStatus::Code(c) => ExitStatus::Code(c),
                    warren_runtime::ExitStatus::Signal(s) => ExitStatus::Signal(s),
                },
            },
            tasks::TaskState::Failed { error } => TaskState::Failed { error },
        },
        log_bytes: info.log_bytes,
    }
}

/// Feeds `stdin` to a started command and reads its output (each stream up to
/// [`EXEC_OUTPUT_LIMIT`]) until it ends.
fn run_to_end(
    io: warren_runtime::ExecIo,
    process: &dyn warren_runtime::Process,
    stdin: String,
) -> Result<ExecResponse, RuntimeError> {
    use std::io::{Read, Write};
    let warren_runtime::ExecIo::Pipes {
        stdin: mut input,
        stdout,
        stderr,
    } = io
    else {
        return Err(RuntimeError::Os {
            call: "exec",
            cause: std::io::Error::other("the command was given a terminal, not pipes"),
        });
    };
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(stdin.as_bytes());
    });
    let read = |stream: std::fs::File| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut limited = stream.take(EXEC_OUTPUT_LIMIT);
            let _ = limited.read_to_end(&mut buf);
            // Drain the rest so the process is never blocked on a full pipe.
            let _ = std::io::copy(&mut limited.into_inner(), &mut std::io::sink());
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let (out, err) = (read(stdout), read(stderr));
    let status = process.wait()?;
    let _ = writer.join();
    Ok(ExecResponse {
        exit_code: status.as_shell_code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}
