//! Watching: one listener per service on PostgreSQL's channel
//! `casepath_changed` (every projection notifies it in its apply
//! transaction, with the keys of what the commit touched:
//! [`crate::domain::changes`]) hands each change to every watcher; each
//! watcher sends its answer at once and then re-runs the same query, with
//! the same permission checks, on each change that concerns it (a path's:
//! one that touches its person or a record its last read found; an
//! inbox's: every change), coalesced (at most one query per
//! `NRM_CASEPATH__WATCH_INTERVAL_MS`), sending it only when it differs from
//! the last one sent (times that only age — `as_of`, `time_left`, `spent` —
//! are not differences). An answer also changes by the clock alone, when
//! an item it shows (or, overdue only, would show) passes its due time,
//! and (a path) when a consent of the person lapses: each watcher also
//! wakes then, at the earliest such time still ahead of its last answer,
//! without any change. A watch ends with the query's error (a path the
//! caller no longer sees: `PERMISSION_DENIED`), with `UNAUTHENTICATED` when
//! the caller's token expires, when the client goes away, and when the
//! service stops.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use futures::Stream;
use nrm_kernel::command::CallContext;
use nrm_kernel::error::AppError;
use nrm_proto::casepath::v1 as pb;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::Casepath;
use super::inbox::InboxQuery;
use super::path::parse_person;
use crate::domain::changes::{self, Token, WatchKey};

/// How long a watch's last answer (why it ends) waits for a client that
/// does not take the answers before it: the watch ends without it then.
const LAST_WORD: Duration = Duration::from_secs(1);

/// Why a watch ends when the service stops.
fn stopping() -> Status {
    Status::unavailable("the service is stopping; watch again")
}

/// Why a watch ends when its token expires.
fn expired() -> Status {
    Status::unauthenticated("the token expired; watch again with a new one")
}

/// Sends `status` as a watch's last answer, waiting at most [`LAST_WORD`]
/// for room: a client that stopped reading holds no watch open.
async fn end_with<T>(tx: &mpsc::Sender<Result<T, Status>>, status: Status) {
    let _ = tokio::time::timeout(LAST_WORD, tx.send(Err(status))).await;
}

/// Sends `answer` to a client that may have stopped reading, unless the
/// service stops (`closing`) or the token expires (`expiry`) first: the
/// watch then ends with its last answer. Whether the watch goes on (false
/// too when the client went away).
async fn deliver<T, E: Future<Output = ()>>(
    tx: &mpsc::Sender<Result<T, Status>>,
    answer: T,
    closing: &CancellationToken,
    expiry: std::pin::Pin<&mut E>,
    expires_at: Option<DateTime<Utc>>,
) -> bool {
    // The token's clock, not tokio's: a timer set from it runs late when
    // the wall clock steps forward.
    if expires_at.is_some_and(|at| at <= Utc::now()) {
        end_with(tx, expired()).await;
        return false;
    }
    // Biased: an expiry or a stop already come wins over room to send.
    tokio::select! {
        biased;
        () = expiry => {
            end_with(tx, expired()).await;
            false
        }
        () = closing.cancelled() => {
            end_with(tx, stopping()).await;
            false
        }
        sent = tx.send(Ok(answer)) => sent.is_ok(),
    }
}

/// The channel the projections notify.
pub const CHANNEL: &str = "casepath_changed";

/// How many changes a watcher may fall behind by before it is told it
/// missed some (and then looks again, as for any change).
pub const BACKLOG: usize = 1024;

/// A change as every watcher receives it.
pub type Change = Arc<changes::Change>;

/// The key of the tokens changes name, from casepath's database (made by
/// its migrations).
///
/// # Errors
/// When the database fails.
pub async fn load_key(pool: &sqlx::PgPool) -> Result<WatchKey, anyhow::Error> {
    let key: Vec<u8> = sqlx::query_scalar("SELECT key FROM casepath_watch_key")
        .fetch_one(pool)
        .await
        .map_err(|e| anyhow::anyhow!("casepath's watch key cannot be read: {e}"))?;
    Ok(WatchKey::new(&key))
}

/// Listens on [`CHANNEL`] until `stop`, handing every notification's
/// change to `changes`, and [`changes::Change::All`] on every (re)connect (what
/// changed while nobody listened is looked at again); reconnects when
/// PostgreSQL goes away.
pub async fn listen(pool: sqlx::PgPool, changes: broadcast::Sender<Change>, stop: CancellationToken) {
    // None listening is no error.
    let hand = |t: changes::Change| {
        let _ = changes.send(Arc::new(t));
    };
    while !stop.is_cancelled() {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "casepath_changed listener cannot connect; retrying");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        // Whatever changed while nobody listened is looked at again.
        hand(changes::Change::All);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                received = listener.try_recv() => match received {
                    Ok(Some(n)) => hand(changes::Change::parse(n.payload())),
                    // The connection was lost; the next call reconnects.
                    Ok(None) => hand(changes::Change::All),
                    Err(e) => {
                        tracing::warn!(error = %e, "casepath_changed listener failed; reconnecting");
                        break;
                    }
                },
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// The expiry (`exp`) of the bearer token in an `authorization` value the
/// gate already verified; none when it cannot be read.
#[must_use]
pub fn token_expiry(authorization: &str) -> Option<DateTime<Utc>> {
    let token = authorization
        .strip_prefix("Bearer ")
        .or_else(|| authorization.strip_prefix("bearer "))?
        .trim();
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    DateTime::from_timestamp(claims.get("exp")?.as_i64()?, 0)
}

/// A stream of answers.
pub type Answers<T> = std::pin::Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A path without what only ages.
fn path_key(p: &pb::Path) -> pb::Path {
    let mut p = p.clone();
    p.as_of = None;
    for s in &mut p.steps {
        s.spent = None;
    }
    for s in &mut p.stages {
        s.spent = None;
    }
    for w in &mut p.waiting {
        w.time_left = None;
    }
    p
}

/// An inbox without what only ages.
fn inbox_key(i: &pb::Inbox) -> pb::Inbox {
    let mut i = i.clone();
    i.as_of = None;
    for item in &mut i.items {
        item.time_left = None;
    }
    i
}

/// The earliest due time still ahead among `items` (not yet overdue).
fn next_due(items: &[pb::InboxItem]) -> Option<DateTime<Utc>> {
    items
        .iter()
        .filter(|i| !i.overdue)
        .filter_map(|i| i.due_at.as_ref().and_then(nrm_kernel::validate::to_datetime))
        .min()
}

/// The earlier of two times that may be none.
fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sleeps until just after `at` (an item is overdue once its due time has
/// passed); forever without one.
async fn sleep_past(at: Option<DateTime<Utc>>) {
    match at {
        Some(at) => {
            let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
            tokio::time::sleep(left + Duration::from_millis(1)).await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// The open watches of each caller (agency, officer) of this process.
pub type Watchers = Arc<std::sync::Mutex<HashMap<(String, String), u32>>>;

/// One open watch of a caller, counted in [`Watchers`] until it is dropped
/// (the watch ended, however: expired, stopped, refused, its client gone).
pub struct WatchTurn {
    watchers: Watchers,
    caller: (String, String),
}

impl WatchTurn {
    /// A turn for the caller (`agency`, `officer`), unless they hold `max`
    /// (at least 1) already.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when they do; logged with the caller's agency
    /// and officer ID only, and counted in `nrm_casepath_watches_refused_total`.
    pub fn take(watchers: &Watchers, agency: &str, officer: &str, max: u32) -> Result<Self, AppError> {
        let caller = (agency.to_owned(), officer.to_owned());
        let refused = {
            let mut open = watchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let count = open.entry(caller.clone()).or_insert(0);
            if *count >= max.max(1) {
                Some(*count)
            } else {
                *count += 1;
                None
            }
        };
        // Logged outside the lock every open and close goes through.
        if let Some(open) = refused {
            tracing::warn!(agency = %caller.0, officer = %caller.1, open, "a watch refused: the caller has as many open as one may");
            metrics::counter!("nrm_casepath_watches_refused_total").increment(1);
            return Err(AppError::ResourceExhausted {
                reason: "TOO_MANY_WATCHES",
                message: "as many watches are open for this officer as one may have: end one, or wait for one to expire",
            });
        }
        Ok(Self {
            watchers: watchers.clone(),
            caller,
        })
    }
}

impl Drop for WatchTurn {
    fn drop(&mut self) {
        let mut open = self.watchers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.caller) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.caller);
            }
        }
    }
}

/// An answer, the earliest time the clock alone changes it, and the tokens
/// of the keys whose change may change it (`None`: any change).
type Answer<T> = (T, Option<DateTime<Utc>>, Option<HashSet<Token>>);

impl Casepath {
    /// Runs `query` on every change that concerns its last answer, and
    /// when the clock alone changes the answer (the due time `query`
    /// returns beside it), until the watch ends; `first` was sent. An
    /// answer that differs from the last one sent goes through `announce`
    /// (its audit) before it is sent.
    #[allow(clippy::too_many_arguments)]
    async fn follow<T, K, F, Fut, A, AFut>(
        self,
        first: Answer<T>,
        key: fn(&T) -> K,
        mut query: F,
        mut announce: A,
        expires_at: Option<DateTime<Utc>>,
        mut changes: broadcast::Receiver<Change>,
        tx: mpsc::Sender<Result<T, Status>>,
    ) where
        T: Send + 'static,
        K: PartialEq + Send,
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<Answer<T>, AppError>> + Send,
        A: FnMut(T) -> AFut + Send,
        AFut: Future<Output = Result<T, AppError>> + Send,
    {
        let interval = Duration::from_millis(self.settings.watch_interval_ms);
        let (first, mut due, mut interest) = first;
        let mut last = key(&first);
        let expiry = async {
            match expires_at {
                Some(at) => {
                    let left = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::pin!(expiry);
        let mut next_query = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                biased;
                () = &mut expiry => {
                    end_with(&tx, expired()).await;
                    return;
                }
                () = self.closing.cancelled() => {
                    end_with(&tx, stopping()).await;
                    return;
                }
                () = tx.closed() => return,
                received = changes.recv() => match received {
                    Ok(change) => if !change.concerns(interest.as_ref()) { continue },
                    // Some were missed: any of them may have concerned it.
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                () = sleep_past(due) => {}
            }
            // Coalesce: changes arriving until the interval is over are one.
            tokio::select! {
                biased;
                () = &mut expiry => {
                    end_with(&tx, expired()).await;
                    return;
                }
                () = self.closing.cancelled() => {
                    end_with(&tx, stopping()).await;
                    return;
                }
                () = tx.closed() => return,
                () = tokio::time::sleep_until(next_query) => {}
            }
            // A turn among the watches' queries (they wait, they are not
            // refused): however many watches are open, they take at most
            // a quarter of the pool, and the gate's calls the rest.
            let turn = tokio::select! {
                biased;
                () = &mut expiry => {
                    end_with(&tx, expired()).await;
                    return;
                }
                () = self.closing.cancelled() => {
                    end_with(&tx, stopping()).await;
                    return;
                }
                () = tx.closed() => return,
                turn = self.rechecks.clone().acquire_owned() => match turn {
                    Ok(turn) => turn,
                    Err(_) => return,
                }
            };
            // What arrived until now committed before the query's read: it
            // sees all of it.
            loop {
                match changes.try_recv() {
                    Ok(_) | Err(TryRecvError::Lagged(_)) => {}
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Closed) => return,
                }
            }
            next_query = tokio::time::Instant::now() + interval;
            // Nothing is read for a token that has expired, whatever the
            // timers said (the clock is the token's, not tokio's).
            if expires_at.is_some_and(|at| at <= Utc::now()) {
                end_with(&tx, expired()).await;
                return;
            }
            let send = match query().await {
                // Read past the expiry (after a wait for a connection):
                // neither audited nor sent.
                Ok(_) if expires_at.is_some_and(|at| at <= Utc::now()) => {
                    end_with(&tx, expired()).await;
                    return;
                }
                Ok((answer, next, keys)) => {
                    due = next;
                    interest = keys;
                    let k = key(&answer);
                    if k == last {
                        None
                    } else {
                        last = k;
                        Some(announce(answer).await)
                    }
                }
                Err(e) => Some(Err(e)),
            };
            // Not held while a slow client takes its answer.
            drop(turn);
            let went_on = match send {
                None => true,
                Some(Ok(answer)) => deliver(&tx, answer, &self.closing, expiry.as_mut(), expires_at).await,
                Some(Err(e)) => {
                    end_with(&tx, e.into()).await;
                    false
                }
            };
            if !went_on {
                return;
            }
        }
    }

    /// `WatchPath`: the path now (audited like a `GetPath`), then on every
    /// change; each changed path is audited again (`WatchPath:update`)
    /// before it is sent, since it may show parts the first did not.
    ///
    /// # Errors
    /// As [`Casepath::get_path`], for the first answer; `RESOURCE_EXHAUSTED`
    /// when the caller has `max_watches_per_officer` watches open.
    #[tracing::instrument(skip_all, fields(person_id = tracing::field::Empty))]
    pub async fn watch_path(
        &self,
        ctx: CallContext,
        req: &pb::GetPathRequest,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<Answers<pb::Path>, AppError> {
        let person = parse_person(&req.person_id)?;
        // Before the person is named in the span: a refusal's log line
        // names the caller only.
        let turn = WatchTurn::take(
            &self.watchers,
            ctx.agency(),
            &ctx.caller.actor.officer,
            self.settings.max_watches_per_officer,
        )?;
        tracing::Span::current().record("person_id", tracing::field::display(person));
        ctx.concerns(person);
        ctx.concerns_person(person);
        let changes = self.changes.subscribe();
        let (first, interest, lapses) = self.path_watched(&ctx, person).await?;
        self.audit_path(&ctx, "WatchPath", &first).await?;
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.send(Ok(first.clone())).await;
        let app = self.clone();
        let query_app = self.clone();
        let announce_ctx = ctx.clone();
        tokio::spawn(async move {
            let _turn = turn;
            let query = move || {
                let (app, ctx) = (query_app.clone(), ctx.clone());
                async move {
                    let (path, interest, lapses) = match app.path_watched(&ctx, person).await {
                        Ok(watched) => watched,
                        Err(e) => {
                            if matches!(e, AppError::PermissionDenied(_)) {
                                // The watch ends refused (a consent withdrawn, a case
                                // handed on): the refusal is on the trail as well.
                                let subject = person.to_string();
                                let entry = ctx
                                    .audit_entry("WatchPath:denied", &subject, "refused")
                                    .outcome(nrm_kernel::audit::Outcome::Denied);
                                let mut conn = app.pool.acquire().await?;
                                nrm_kernel::audit::append(&mut conn, &entry).await?;
                            }
                            return Err(e);
                        }
                    };
                    let due = earliest(next_due(&path.waiting), lapses);
                    Ok((path, due, Some(app.watch_key.tokens(&interest))))
                }
            };
            let announce_app = app.clone();
            let announce = move |path: pb::Path| {
                let (app, ctx) = (announce_app.clone(), announce_ctx.clone());
                async move {
                    app.audit_path(&ctx, "WatchPath:update", &path).await?;
                    Ok(path)
                }
            };
            let due = earliest(next_due(&first.waiting), lapses);
            let interest = app.watch_key.tokens(&interest);
            app.follow(
                (first, due, Some(interest)),
                path_key,
                query,
                announce,
                expires_at,
                changes,
                tx,
            )
            .await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// `WatchInbox`: the inbox now, then on every change (any change may
    /// concern an agency's inbox; each changed
    /// inbox audited as `WatchInbox:update` before it is sent).
    ///
    /// # Errors
    /// As [`Casepath::list_inbox`], for the first answer; `RESOURCE_EXHAUSTED`
    /// when the caller has `max_watches_per_officer` watches open.
    #[tracing::instrument(skip_all)]
    pub async fn watch_inbox(
        &self,
        ctx: CallContext,
        req: &pb::ListInboxRequest,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<Answers<pb::Inbox>, AppError> {
        let query = InboxQuery::parse(&ctx, req)?;
        let turn = WatchTurn::take(
            &self.watchers,
            ctx.agency(),
            &ctx.caller.actor.officer,
            self.settings.max_watches_per_officer,
        )?;
        let changes = self.changes.subscribe();
        let first = self.inbox_until(&ctx, &query).await?;
        self.audit_inbox(&ctx, "WatchInbox", &query, &first.0).await?;
        let (tx, rx) = mpsc::channel(4);
        let _ = tx.send(Ok(first.0.clone())).await;
        let app = self.clone();
        let query_app = self.clone();
        let (announce_ctx, announce_query) = (ctx.clone(), query.clone());
        tokio::spawn(async move {
            let _turn = turn;
            let run = move || {
                let (app, ctx, query) = (query_app.clone(), ctx.clone(), query.clone());
                async move {
                    let (inbox, due) = app.inbox_until(&ctx, &query).await?;
                    Ok((inbox, due, None))
                }
            };
            let announce_app = app.clone();
            let announce = move |inbox: pb::Inbox| {
                let (app, ctx, query) = (announce_app.clone(), announce_ctx.clone(), announce_query.clone());
                async move {
                    app.audit_inbox(&ctx, "WatchInbox:update", &query, &inbox).await?;
                    Ok(inbox)
                }
            };
            app.follow(
                (first.0, first.1, None),
                inbox_key,
                run,
                announce,
                expires_at,
                changes,
                tx,
            )
            .await;
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn an_officer_holds_at_most_max_watches_and_a_watch_ended_gives_its_turn_back() {
        let watchers = super::Watchers::default();
        let take = |officer: &str| super::WatchTurn::take(&watchers, "kg-msd", officer, 2);
        let first = take("o-1").unwrap();
        let second = take("o-1").unwrap();
        let refused = take("o-1").err().unwrap();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Another officer of the agency, or of another agency, is not held back.
        let other = take("o-2").unwrap();
        let elsewhere = super::WatchTurn::take(&watchers, "kg-mvd", "o-1", 2).unwrap();
        drop(first);
        let again = take("o-1").unwrap();
        assert!(take("o-1").is_err());
        drop((second, again, other, elsewhere));
        assert!(watchers.lock().unwrap().is_empty(), "no caller is left counted");
    }

    use super::*;

    #[test]
    fn the_expiry_is_read_from_the_token() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"o","exp":1790000000}"#);
        let header = format!("Bearer aGVhZA.{payload}.c2ln");
        assert_eq!(token_expiry(&header), DateTime::from_timestamp(1_790_000_000, 0));
        assert_eq!(token_expiry("Basic x"), None);
        assert_eq!(token_expiry("Bearer not-a-jwt"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_a_client_does_not_take_gives_way_to_the_stop() {
        let (tx, mut rx) = mpsc::channel::<Result<u32, Status>>(1);
        tx.send(Ok(1)).await.unwrap();
        let closing = CancellationToken::new();
        let never = std::future::pending::<()>();
        tokio::pin!(never);
        let delivering = deliver(&tx, 2, &closing, never.as_mut(), None);
        tokio::pin!(delivering);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut delivering)
                .await
                .is_err(),
            "it waits for a client that does not read while nothing ends the watch"
        );
        closing.cancel();
        let started = tokio::time::Instant::now();
        let went_on = tokio::time::timeout(Duration::from_secs(60), delivering)
            .await
            .expect("the stop ends the watch");
        assert!(!went_on, "the watch ends");
        assert_eq!(started.elapsed(), LAST_WORD, "after its last word found no room");
        assert_eq!(rx.try_recv().unwrap().unwrap(), 1);
        assert!(
            rx.try_recv().is_err(),
            "neither the answer nor the last word was queued"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_a_client_does_not_take_gives_way_to_the_token_expiring() {
        let (tx, _rx) = mpsc::channel::<Result<u32, Status>>(1);
        tx.send(Ok(1)).await.unwrap();
        let expiry = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(expiry);
        let started = tokio::time::Instant::now();
        let closing = CancellationToken::new();
        let delivering = deliver(&tx, 2, &closing, expiry.as_mut(), None);
        let went_on = tokio::time::timeout(Duration::from_secs(60), delivering)
            .await
            .expect("the expiry ends the watch");
        assert!(!went_on);
        assert_eq!(started.elapsed(), Duration::from_secs(5) + LAST_WORD);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_not_sent_once_the_token_has_expired_even_with_room() {
        let (tx, mut rx) = mpsc::channel::<Result<u32, Status>>(4);
        let expiry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(expiry);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let closing = CancellationToken::new();
        for _ in 0..20 {
            assert!(!deliver(&tx, 2, &closing, expiry.as_mut(), None).await);
            let sent = rx.try_recv().expect("the last word was queued");
            assert_eq!(sent.map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
            assert!(rx.try_recv().is_err(), "the answer was sent after the expiry");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_not_sent_past_the_tokens_own_clock_whatever_the_timer_says() {
        let (tx, mut rx) = mpsc::channel::<Result<u32, Status>>(4);
        // A timer that has not fired (the wall clock stepped forward).
        let late = std::future::pending::<()>();
        tokio::pin!(late);
        let closing = CancellationToken::new();
        let expired_at = Some(Utc::now() - chrono::TimeDelta::seconds(1));
        assert!(!deliver(&tx, 2, &closing, late.as_mut(), expired_at).await);
        let sent = rx.try_recv().expect("the last word was queued");
        assert_eq!(sent.map_err(|s| s.code()), Err(tonic::Code::Unauthenticated));
        assert!(rx.try_recv().is_err(), "the answer was sent after the expiry");
        let valid = Some(Utc::now() + chrono::TimeDelta::hours(1));
        assert!(deliver(&tx, 3, &closing, late.as_mut(), valid).await);
        assert_eq!(rx.try_recv().unwrap().unwrap(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_word_reaches_a_client_that_reads() {
        let (tx, mut rx) = mpsc::channel::<Result<u32, Status>>(1);
        tx.send(Ok(1)).await.unwrap();
        let reader = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = Vec::new();
            while let Some(answer) = rx.recv().await {
                got.push(answer.map_err(|s| s.code()));
            }
            got
        });
        end_with(&tx, stopping()).await;
        drop(tx);
        assert_eq!(reader.await.unwrap(), vec![Ok(1), Err(tonic::Code::Unavailable)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_word_waits_at_most_a_second_for_a_client_that_does_not_read() {
        let (tx, _rx) = mpsc::channel::<Result<u32, Status>>(1);
        tx.send(Ok(1)).await.unwrap();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(60), end_with(&tx, stopping()))
            .await
            .expect("the last word gives up");
        assert_eq!(started.elapsed(), LAST_WORD);
    }

    #[test]
    fn only_aging_times_are_ignored_when_comparing() {
        let a = pb::Path {
            as_of: Some(prost_types::Timestamp { seconds: 1, nanos: 0 }),
            steps: vec![pb::Step {
                kind: 2,
                spent: Some(prost_types::Duration { seconds: 5, nanos: 0 }),
                ..pb::Step::default()
            }],
            ..pb::Path::default()
        };
        let mut b = a.clone();
        b.as_of = Some(prost_types::Timestamp { seconds: 9, nanos: 0 });
        b.steps[0].spent = Some(prost_types::Duration { seconds: 50, nanos: 0 });
        assert_eq!(path_key(&a), path_key(&b));
        b.steps[0].kind = 3;
        assert_ne!(path_key(&a), path_key(&b));
    }
}
