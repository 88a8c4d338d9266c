//! Server-sent events: rows of the workspace list as they change, and a task's output as it
//! is written. Each stream looks as the signed-in user, through the API's functions.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use base64::Engine as _;
use futures_util::stream::{self, Stream};
use serde::Deserialize;

use super::pages::{RowFragment, row};
use super::{Session, UiError};
use crate::api;
use crate::state::AppState;
use crate::workspaces::Workspace;
use warren_api::LogQuery;
use warren_protocol::build_log::Mark;

/// How often a stream looks again.
const LIST_TICK: Duration = Duration::from_secs(1);
const LOG_TICK: Duration = Duration::from_millis(500);
/// How often a stream asks whether its sign-in still holds.
const SESSION_TICK: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
pub(crate) struct ListQuery {
    /// Only this workspace (its page).
    #[serde(default)]
    id: Option<String>,
}

/// `row` events (a workspace's row, rendered) when a workspace the user may see changes, and
/// `gone` (the row's element id) when one goes. The first look sends every row, then `synced`.
pub(crate) async fn workspaces(
    State(state): State<AppState>,
    session: Session,
    Query(query): Query<ListQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, UiError> {
    let slot = stream_slot(&state, &session)?;
    let watch = ListWatch {
        state,
        session,
        only: query.id,
        seen: HashMap::new(),
        behind: HashMap::new(),
        pending: VecDeque::new(),
        fingerprint: None,
        first: true,
        checked: std::time::Instant::now(),
        _slot: slot,
    };
    let events = stream::unfold(watch, |mut watch| async move {
        loop {
            if let Some(event) = watch.pending.pop_front() {
                return Some((Ok(event), watch));
            }
            // A stream ends with its sign-in (signed out, expired), asked every SESSION_TICK.
            if watch.checked.elapsed() >= SESSION_TICK {
                watch.checked = std::time::Instant::now();
                if !watch.session.holds(&watch.state).await {
                    return None;
                }
            }
            if watch.first {
                watch.look().await;
                watch.first = false;
                watch
                    .pending
                    .push_back(Event::default().event("synced").data("all rows sent"));
                continue;
            }
            tokio::time::sleep(LIST_TICK).await;
            watch.look().await;
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Event streams one user may hold open at once (a few tabs' worth).
const STREAMS_PER_USER: usize = 8;

fn stream_slot(state: &AppState, session: &Session) -> Result<crate::state::Slot, UiError> {
    state
        .streams
        .admit(&session.caller.user_id, STREAMS_PER_USER)
        .ok_or_else(|| {
            UiError(crate::error::ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!("you have {STREAMS_PER_USER} live pages open already: close one"),
            ))
        })
}

struct ListWatch {
    state: AppState,
    session: Session,
    only: Option<String>,
    /// What each row showed when it was last sent.
    seen: HashMap<String, String>,
    /// How far behind its branch each (prebuild commit, branch head) is: asked of git once.
    behind: HashMap<(String, String), Option<u64>>,
    pending: VecDeque<Event>,
    /// The workspaces' fingerprint at the last full look.
    fingerprint: Option<Fingerprint>,
    first: bool,
    /// When the sign-in was last asked about.
    checked: std::time::Instant,
    _slot: crate::state::Slot,
}

/// What changes when anything a row shows changes: how many workspaces there are, the latest
/// state change, report, use and stop reason. One small query; when it is as it was, a
/// stream does not read the rows again.
type Fingerprint = (i64, Option<i64>, Option<i64>, Option<i64>, i64);

async fn fingerprint(state: &AppState) -> Result<Fingerprint, sqlx::Error> {
    sqlx::query_as(
        "SELECT COUNT(*), MAX(updated_at), MAX(stats_at), MAX(last_active_at), COUNT(stop_reason) FROM workspaces",
    )
    .fetch_one(&state.db.pool)
    .await
}

impl ListWatch {
    async fn look(&mut self) {
        // A database that fails now is asked again at the next tick.
        let Ok(print) = fingerprint(&self.state).await else {
            return;
        };
        if self.fingerprint == Some(print) {
            return;
        }
        let Ok(found) = api::visible_workspaces(&self.state, &self.session.caller).await else {
            return;
        };
        self.fingerprint = Some(print);
        let mut now = HashMap::new();
        for w in found
            .iter()
            .filter(|w| self.only.as_ref().is_none_or(|id| *id == w.id.0))
        {
            let shown = shown(w);
            if self.seen.get(&w.id.0) != Some(&shown) {
                let mut view = api::workspace_view(&self.state, w);
                if let (Some(commit), Some(head), Some(url)) =
                    (&w.prebuild_commit, &w.branch_head, &w.git_url)
                {
                    let key = (commit.clone(), head.clone());
                    view.behind = match self.behind.get(&key) {
                        Some(known) => *known,
                        None => {
                            let asked = crate::prebuilds::behind(
                                &self.state.git_mirrors,
                                url,
                                commit,
                                head,
                            )
                            .await;
                            self.behind.insert(key, asked);
                            asked
                        }
                    };
                }
                let row = RowFragment {
                    row: row(&self.state, &self.session.caller, w, &view),
                };
                if let Ok(html) = askama::Template::render(&row) {
                    self.pending
                        .push_back(Event::default().event("row").data(html));
                }
            }
            now.insert(w.id.0.clone(), shown);
        }
        for gone in self.seen.keys().filter(|id| !now.contains_key(*id)) {
            self.pending
                .push_back(Event::default().event("gone").data(format!("ws-{gone}")));
        }
        self.seen = now;
    }
}

/// What a row shows that can change (its memory as shown: a host's report that changes no
/// figure on the page sends no row).
fn shown(w: &Workspace) -> String {
    format!(
        "{}|{}|{:?}|{}|{}|{}|{:?}|{:?}",
        w.state,
        w.desired,
        w.last_error,
        w.updated_at,
        super::pages::memory_shown(w),
        w.host,
        w.last_active_at,
        w.stop_reason
    )
}

#[derive(Deserialize)]
pub(crate) struct FollowQuery {
    #[serde(default)]
    offset: u64,
}

/// A task's output from `?offset=`: `log` events (the text as a JSON string, with the offset
/// after it as the event's id), then `end` once the task has ended and all was sent, or
/// `problem` (a JSON string) when its host cannot be asked.
pub(crate) async fn task_log(
    State(state): State<AppState>,
    session: Session,
    Path((key, task)): Path<(String, String)>,
    Query(query): Query<FollowQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, UiError> {
    // Another user's workspace is 404 here, not a stream of problems.
    let ws = api::find_workspace(&state, &session.caller, &key).await?;
    let slot = stream_slot(&state, &session)?;
    let follow = Follow {
        state,
        session,
        key: ws.id.0,
        task,
        offset: query.offset,
        done: false,
        checked: std::time::Instant::now(),
        _slot: slot,
    };
    let events = stream::unfold(follow, |mut f| async move {
        if f.done {
            return None;
        }
        let event = f.next().await;
        Some((Ok(event), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

struct Follow {
    state: AppState,
    session: Session,
    key: String,
    task: String,
    offset: u64,
    done: bool,
    checked: std::time::Instant,
    _slot: crate::state::Slot,
}

impl Follow {
    async fn next(&mut self) -> Event {
        let problem = |message: String| Event::default().event("problem").data(json(&message));
        loop {
            // A stream ends with its sign-in (signed out, expired).
            if self.checked.elapsed() >= SESSION_TICK {
                self.checked = std::time::Instant::now();
                if !self.session.holds(&self.state).await {
                    self.done = true;
                    return Event::default().event("end").data("signed out");
                }
            }
            let piece = api::task_log(
                State(self.state.clone()),
                self.session.caller.clone(),
                Path((self.key.clone(), self.task.clone())),
                Query(LogQuery {
                    offset: self.offset,
                }),
            )
            .await;
            let log = match piece {
                Ok(Json(log)) => log,
                Err(e) => {
                    self.done = true;
                    return problem(e.message);
                }
            };
            let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(&log.data_base64)
            else {
                self.done = true;
                return problem("the host answered a log that is not base64".to_owned());
            };
            // A character cut at the end of this piece is sent whole with the next.
            let keep = if log.running {
                bytes.len() - incomplete_tail(&bytes)
            } else {
                bytes.len()
            };
            if keep > 0 {
                self.offset += keep as u64;
                let text = terminal_text(&String::from_utf8_lossy(&bytes[..keep]));
                return Event::default()
                    .event("log")
                    .id(self.offset.to_string())
                    .data(json(&text));
            }
            if !log.running {
                self.done = true;
                return Event::default().event("end").data("the task has ended");
            }
            tokio::time::sleep(LOG_TICK).await;
        }
    }
}

/// A prebuild's log from `?offset=`, whole lines at a time (so a stream resumed at an offset
/// begins at a line's start): `log` events as a task's, a `step` event (its title, a JSON
/// string) for each line that begins a step and `cached` for one that says the step came from
/// the cache, then `end` (the prebuild's final state, a JSON string) once it ended and all
/// was sent.
pub(crate) async fn prebuild_log(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Query(query): Query<FollowQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, UiError> {
    // Another user's prebuild is 404 here, not a stream of problems.
    let Json(prebuild) =
        api::get_prebuild(State(state.clone()), session.caller.clone(), Path(id)).await?;
    let slot = stream_slot(&state, &session)?;
    let follow = BuildFollow {
        state,
        session,
        id: prebuild.id,
        offset: query.offset,
        pending: VecDeque::new(),
        steps: 0,
        done: false,
        checked: std::time::Instant::now(),
        _slot: slot,
    };
    let events = stream::unfold(follow, |mut f| async move {
        let event = f.next().await?;
        Some((Ok(event), f))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Stored pieces of a prebuild's log one look reads (each at most the API's body limit).
const PIECES_PER_LOOK: usize = 8;
/// A line this long is sent before its end comes.
const LONG_LINE: usize = 64 << 10;
/// Steps a stream names, and the characters of each step's title.
const STEPS_SHOWN: usize = 500;
const STEP_TITLE: usize = 200;

struct BuildFollow {
    state: AppState,
    session: Session,
    id: String,
    offset: u64,
    /// Events of the last look, not sent yet (at most one look's worth).
    pending: VecDeque<Event>,
    /// Step events sent.
    steps: usize,
    done: bool,
    checked: std::time::Instant,
    _slot: crate::state::Slot,
}

impl BuildFollow {
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            if self.done {
                return None;
            }
            if self.checked.elapsed() >= SESSION_TICK {
                self.checked = std::time::Instant::now();
                if !self.session.holds(&self.state).await {
                    self.done = true;
                    return Some(Event::default().event("end").data(json("signed out")));
                }
            }
            let caller = || self.session.caller.clone();
            let piece = api::read_log(
                &self.state,
                &self.session.caller,
                &self.id,
                self.offset,
                Some(PIECES_PER_LOOK),
            )
            .await;
            let (log, more) = match piece {
                Ok(read) => read,
                Err(e) => {
                    self.done = true;
                    return Some(Event::default().event("problem").data(json(&e.message)));
                }
            };
            let text = log.text.as_str();
            // Whole lines, but not forever: a line longer than LONG_LINE, or one that goes on
            // past what one look reads, is sent as it is.
            let keep = if log.done || more || text.len() >= LONG_LINE {
                text.len()
            } else {
                text.rfind('\n').map_or(0, |end| end + 1)
            };
            if keep > 0 {
                self.offset = log.offset - (text.len() - keep) as u64;
                let lines = &text[..keep];
                self.pending.push_back(
                    Event::default()
                        .event("log")
                        .id(self.offset.to_string())
                        .data(json(&terminal_text(lines))),
                );
                for line in lines.lines() {
                    // A build's output can print step lines too: the list stays a list.
                    if self.steps >= STEPS_SHOWN {
                        break;
                    }
                    match warren_protocol::build_log::mark(line) {
                        Some(Mark::Step) => {
                            self.steps += 1;
                            let title: String = line.chars().take(STEP_TITLE).collect();
                            self.pending
                                .push_back(Event::default().event("step").data(json(&title)));
                        }
                        Some(Mark::Cached) => self
                            .pending
                            .push_back(Event::default().event("cached").data("1")),
                        None => {}
                    }
                }
                continue;
            }
            if log.done {
                self.done = true;
                let ended =
                    api::get_prebuild(State(self.state.clone()), caller(), Path(self.id.clone()))
                        .await
                        .map_or_else(|e| e.message, |Json(p)| p.state.to_string());
                return Some(Event::default().event("end").data(json(&ended)));
            }
            tokio::time::sleep(LOG_TICK).await;
        }
    }
}

/// An event's text, as JSON. (An event must carry some data: a browser drops one without.)
fn json(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

/// How many bytes at the end of `bytes` begin a UTF-8 character that is not complete yet.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(4) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 == 0x80 {
            continue;
        }
        let needs = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

/// A terminal's output as plain text for a page: escape sequences (colours, cursor moves,
/// titles) and other control characters dropped; a carriage return ends a line.
fn terminal_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters, then one final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {
                if chars.peek() != Some(&'\n') {
                    out.push('\n');
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_character_waits_for_its_end() {
        let e_acute = "é".as_bytes();
        let euro = "€".as_bytes();
        assert_eq!(incomplete_tail(b"abc"), 0);
        assert_eq!(incomplete_tail(&[b'a', e_acute[0]]), 1);
        assert_eq!(incomplete_tail(e_acute), 0);
        assert_eq!(incomplete_tail(&euro[..2]), 2);
        assert_eq!(incomplete_tail(euro), 0);
        assert_eq!(incomplete_tail(&"🦀".as_bytes()[..3]), 3);
        assert_eq!(incomplete_tail(b""), 0);
        // Bytes that are no character at all are not waited for.
        assert_eq!(incomplete_tail(&[0x80, 0x80, 0x80, 0x80, 0x80]), 0);
    }

    #[test]
    fn terminal_output_reads_as_text() {
        assert_eq!(
            terminal_text("\u{1b}[1;32mok\u{1b}[0m\r\nnext\u{7}\u{1b}]0;title\u{7}!"),
            "ok\nnext!"
        );
        assert_eq!(terminal_text("10%\r20%\rdone\n"), "10%\n20%\ndone\n");
        assert_eq!(terminal_text("a\u{1b}]2;t\u{1b}\\b\tc"), "ab\tc");
    }
}
