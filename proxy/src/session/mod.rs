//! A client session: client → session → fan-out → backends → comparison → client.
//!
//! One task per client drives one event loop (`Session::run`). Client frames are cut, routed
//! (`route`) and queued to the chosen backends; each dispatched request is remembered in
//! `pending`. Backend replies are read from every connection; the first backend to answer a
//! request becomes its primary and its frames go to the client as they arrived. The other
//! backends' replies are only condensed into an `Outcome` and compared when every target has
//! finished. Replies are matched to requests by position (per-backend FIFO), so if the primary
//! dies mid-reply another backend takes over at the same message.
//!
//! The loop never awaits on one socket while another waits: all reads and writes are polled
//! together, so a slow client or backend cannot deadlock the session, and no lock is held
//! across an await.

pub mod auth_delay;
mod cancel;
mod record;
mod route;
mod signals;
mod startup;
mod state;

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

pub use cancel::{CancelRegistry, CancelTarget};
use route::{Dispatch, RouteCtx, Router};

use crate::cluster::BackendState;
use crate::config::{CommitAck, UnsafeStatements};
use crate::difflog::Record;
use crate::error::SessionError;
use crate::fanout::{self, vote, BackendConn, LoginError, Outcome};
use crate::order::{Acquire, LockOwner};
use crate::protocol::message::{self, Severity};
use crate::protocol::{FrameCodec, ProtocolError};
use crate::shared::Shared;
use crate::sql::catalog::{CatalogSlot, LoadTarget};
use crate::sql::text::{statement_text, statement_text_raw};
use crate::tls::Stream;
use crate::wire::OutQueue;

/// Stop reading backends while this much waits for the client.
const CLIENT_OUT_HIGH: usize = 1 << 20;
/// Stop reading the client while this much waits for one backend.
const BACKEND_OUT_HIGH: usize = 4 << 20;
/// Unhandled bytes a backend may have buffered while it waits for its turn.
const BACKEND_IN_HIGH: usize = 256 << 10;
/// Backends may send messages as large as PostgreSQL allows (1 GB rows plus framing).
const BACKEND_MAX_MESSAGE: usize = (1 << 30) + 1024;

static RFQ_IDLE: &[u8] = b"Z\0\0\0\x05I";
static RFQ_TX: &[u8] = b"Z\0\0\0\x05T";
static RFQ_FAILED: &[u8] = b"Z\0\0\0\x05E";

fn rfq(status: u8) -> Bytes {
    Bytes::from_static(match status {
        b'T' => RFQ_TX,
        b'E' => RFQ_FAILED,
        _ => RFQ_IDLE,
    })
}

/// One request in flight: a Query, a FunctionCall, or an extended-protocol batch up to Sync.
struct Request {
    seq: u64,
    /// Connections it was sent to, and those that have not finished it yet.
    targets: u64,
    remaining: u64,
    /// The connection whose reply the client gets.
    primary: Option<usize>,
    primary_done: bool,
    /// Reply messages (async ones excluded) already sent to the client.
    forwarded: u32,
    rfq_sent: bool,
    writes: bool,
    hash_rows: bool,
    /// It reads facts of each server (pg_stat_*, process ids): only success, error and the
    /// transaction status are compared.
    per_server: bool,
    /// The lead answers the client (see `may_lead`).
    lead_answers: bool,
    /// It signals processes by pid (`Class::signals`): counted on its backend's `signals`
    /// while in flight.
    signals: bool,
    /// A query cancel one backend reported was passed on to the others still running it.
    cancel_spread: bool,
    /// It is Chorus's own error statement: its ErrorResponse loses the PL/pgSQL context line.
    own_error: bool,
    /// Chorus put its error statement into this batch (`Dispatch::Inject`): the ParseComplete
    /// and BindComplete before its error are held back (`held`) and dropped.
    inject: bool,
    held: Vec<BytesMut>,
    /// The request as sent, kept while it runs outside a transaction on several backends: a
    /// backend that fails it for timing alone (a timeout, a lock wait, a serialization
    /// failure) runs it again under the same locks.
    again: Option<Bytes>,
    /// A request Chorus runs again: the outcome every target must now give.
    expect: Option<Outcome>,
    /// Targets that gave up answering the client: their reply was a timing-dependent error
    /// while another target could still succeed.
    gave_up: u64,
    /// Chorus's own request: its replies are compared and never reach the client.
    internal: bool,
    /// A write outside a transaction that Chorus runs inside its own BEGIN: its
    /// ReadyForQuery is not the client's (Chorus's COMMIT or ROLLBACK after it carries it).
    wrapped: bool,
    /// Chorus's COMMIT or ROLLBACK of a wrapped write: its command tag is not the client's,
    /// its errors and ReadyForQuery are.
    quiet: bool,
    /// A unit's record in the update history: a failure is told to the client.
    record: bool,
    /// Parameter types the client may see per Describe of a statement (Chorus adds its own).
    trims: VecDeque<Option<u16>>,
    /// The request's first frame, for log lines.
    sql: Bytes,
    /// The whole request, kept when a single backend serves a read so another can retry it.
    retry: Option<Bytes>,
    /// A read the lead runs alone inside a transaction: an error there aborts the transaction
    /// on the lead only, and the other backends' transactions are aborted after it.
    lead_read: bool,
    /// Routed inside the client's open transaction, which it does not end: it cannot commit
    /// anything, so a connection lost in the middle of it loses no commit either.
    in_block: bool,
    first_done_at: Option<Instant>,
    sent_at: Instant,
}

/// The SQLSTATE of a record a backend refused for its epoch (`history::schema::FENCED`).
const FENCED: [u8; 5] = *b"57C01";

/// In a planned switchover, how long a session at a transaction boundary that has answered
/// nothing since the drain began waits for its client's next request before it ends.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// What every client of a deposed leader gets: its session ends, it reconnects to the leader.
fn deposed_frame() -> BytesMut {
    let mut f = BytesMut::new();
    message::error_response(
        &mut f,
        Severity::Fatal,
        "57P01",
        "terminating connection: this Chorus no longer leads its group; reconnect to reach the leader",
    );
    f
}

/// A future that completes when something a session waits for may have happened.
type Wakeup = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Why a session ends.
enum End {
    /// Tell the client this, then close.
    Error(SessionError),
    /// Close quietly (client gone or said Terminate).
    Quiet,
    /// Forward this FATAL from a backend, then close: the session's own outcome.
    Fatal(BytesMut),
}

impl From<SessionError> for End {
    fn from(e: SessionError) -> End {
        End::Error(e)
    }
}

impl From<ProtocolError> for End {
    fn from(e: ProtocolError) -> End {
        End::Error(SessionError::Protocol(e))
    }
}

/// What one poll of all sockets found.
#[derive(Default)]
struct Events {
    client_data: bool,
    client_eof: bool,
    backend_data: bool,
    backend_failed: Vec<(usize, String)>,
    /// Checks of backends whose connection ended: (connection, whether the server is healthy).
    checked: Vec<(usize, bool)>,
    token: bool,
    timer: bool,
    shutdown: bool,
}

impl Events {
    fn any(&self) -> bool {
        self.client_data
            || self.client_eof
            || self.backend_data
            || !self.backend_failed.is_empty()
            || !self.checked.is_empty()
            || self.token
            || self.timer
            || self.shutdown
    }
}

pub struct Session {
    shared: Arc<Shared>,
    client: Stream,
    cbuf: BytesMut,
    client_out: OutQueue,
    /// Frames being forwarded to the client that sit next to each other in memory.
    run: Option<BytesMut>,
    client_codec: FrameCodec,
    backend_codec: FrameCodec,
    conns: Vec<BackendConn>,
    pending: VecDeque<Request>,
    next_seq: u64,
    router: Router,
    locks: LockOwner,
    /// Waiting for locks since then: the client is not read meanwhile.
    lock_wait: Option<Instant>,
    catalog: Arc<CatalogSlot>,
    load_target: LoadTarget,
    /// A transaction with DDL is open: the catalog is reloaded when it ends.
    ddl_open: bool,
    /// A write waits for the catalog to load (since then, and the wake-up).
    catalog_wait: Option<(Instant, Wakeup)>,
    last_status: u8,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    last_client_activity: Instant,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    shutting_down: bool,
    /// Shutting down for a planned switchover: the session ends at a transaction boundary,
    /// once it has answered a request since or its client has been quiet for `DRAIN_GRACE`.
    handing_over: bool,
    /// A request was answered since the shutdown began.
    answered_since_stop: bool,
    requests_one: metrics::Counter,
    requests_all: metrics::Counter,
    errors: metrics::Counter,
    latency: metrics::Histogram,
    bytes_in: metrics::Counter,
    bytes_out: metrics::Counter,
    _cancel: cancel::CancelGuard,
    /// Unique per session: its records in the diff log carry it.
    id: u64,
    /// How to log in as this client on a backend that joins (startup parameters as sent).
    params: Vec<(String, String)>,
    settings: state::Settings,
    unit: state::Unit,
    /// The diff log this session has written its Open record to.
    log_opened: u64,
    /// The cluster membership this session's connections reflect.
    epoch: u64,
    /// Backends entered the in-sync set: the session connects to them at its next idle point
    /// and routes nothing until then.
    membership_wait: bool,
    upgrade_due: bool,
    /// The epoch an open transaction was told about (its next write fails with 40001).
    stale_epoch: u64,
    /// Health checks of backends whose connection of this session ended: nothing new is
    /// routed until each has told a failed server from a connection that ended alone.
    checks: Vec<(usize, Wakeup, Arc<std::sync::atomic::AtomicBool>)>,
    /// While a backend holds the session back: when to look again whether it left the set.
    stall_check: Option<Instant>,
    /// Connections whose transaction Chorus is aborting (`timing_split`) and the request that
    /// does it: what they answer to requests before it is not compared.
    aborting: (u64, u64),
    /// A transaction's end waits for every request before it to finish on every backend.
    idle_wait: bool,
    /// A connection to a healthy backend was lost inside a transaction: it is made again at
    /// the next idle point.
    reconnect_due: bool,
    /// The update history, when this session's database has it in place.
    history: Option<Arc<crate::history::History>>,
    /// The unit wrote; it was recorded in the history; requests of it a record covers.
    unit_writes: bool,
    unit_recorded: bool,
    /// Connections (by index) where the record's named statement is prepared: a record there
    /// is Bind, Execute and Sync alone.
    record_prepared: u64,
    recorded_upto: usize,
    /// A write Chorus wrapped in its own transaction is under way: nothing else is routed
    /// until its COMMIT is answered (COPY data and the rest of its batch excepted).
    wrap_open: bool,
    /// The wrapped write's reply, held until its COMMIT is answered.
    wrap_held: Option<BytesMut>,
}

static NEXT_SESSION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Serves one client connection from its first byte to its last.
pub async fn serve(tcp: TcpStream, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let mut client = Stream::Plain(tcp);
    // login_timeout bounds what the client must do (startup and authentication); the backend
    // logins that follow have bounds of their own.
    let auth = tokio::time::timeout(shared.cfg.login_timeout, authenticate(&mut client, &shared)).await;
    let st = match auth {
        Err(_) => {
            tracing::debug!("client sent no complete login within login_timeout");
            let mut buf = BytesMut::new();
            message::error_response(&mut buf, Severity::Fatal, "08P01", "login timeout expired");
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), client.write_all(&buf)).await;
            return;
        }
        Ok(Ok(Some(st))) => st,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            if matches!(e, SessionError::AuthFailed(_) | SessionError::NoSuchUser(_)) {
                if let Ok(peer) = client.peer_addr() {
                    shared.auth_failures.after_failure(peer.ip(), shared.cfg.auth_failure_delay).await;
                }
            }
            tell_and_close(&mut client, &e).await;
            return;
        }
    };
    let session = match login(&mut client, &shared, st).await {
        Ok(Some((conns, guard, target, params, epoch))) => {
            let history = record::history_for(&shared, &target.database).await;
            Session::new(client, shared, conns, guard, target, params, epoch).with_history(history)
        }
        Ok(None) => return,
        Err(e) => {
            tell_and_close(&mut client, &e).await;
            return;
        }
    };
    session.run().await;
}

async fn tell_and_close(client: &mut Stream, e: &SessionError) {
    if let Some(code) = e.sqlstate() {
        tracing::info!(sqlstate = code, error = %e, "client refused");
        let mut buf = BytesMut::new();
        message::error_response(&mut buf, Severity::Fatal, code, &e.to_string());
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), client.write_all(&buf)).await;
    }
}

/// Startup, authentication and backend logins. None for a cancel request.
type LoggedIn = (Vec<BackendConn>, cancel::CancelGuard, LoadTarget, Vec<(String, String)>, u64);

/// The client's part of the login: its startup packet and its password. None for a cancel
/// request (served already) or a client that left.
async fn authenticate(client: &mut Stream, shared: &Arc<Shared>) -> Result<Option<startup::Started>, SessionError> {
    let Some(params) = startup::read_startup(client, shared).await? else {
        return Ok(None);
    };
    if shared.stop.is_cancelled() {
        return Err(SessionError::ShuttingDown);
    }
    startup::authenticate(client, shared, params).await.map(Some)
}

/// Logs the authenticated client in to every in-sync backend.
async fn login(client: &mut Stream, shared: &Arc<Shared>, st: startup::Started) -> Result<Option<LoggedIn>, SessionError> {
    let password = shared.cfg.user(&st.user).map(|u| u.password.clone()).unwrap_or_default();
    // Read before the in-sync set: a backend joining in between is picked up at the first request.
    let epoch = shared.cluster.epoch();
    let in_sync = shared.cluster.in_sync();
    if in_sync.is_empty() {
        return Err(SessionError::NoBackend("every backend is out of the in-sync set".into()));
    }
    let logins = {
        // A storm of logins queues here instead of overrunning the servers' process limits; a
        // client that waited login_timeout in the queue is refused as PostgreSQL refuses one
        // over its limit.
        let _permit = match tokio::time::timeout(shared.cfg.login_timeout, shared.logins.acquire()).await {
            Ok(Ok(p)) => p,
            Ok(Err(_)) => return Err(SessionError::ShuttingDown),
            Err(_) => return Err(SessionError::TooManyClients),
        };
        futures::future::join_all(
            in_sync.iter().map(|b| fanout::connect(b.clone(), &st.params, &st.user, &password, shared.cfg.connect_timeout)),
        )
        .await
    };
    let mut conns = Vec::new();
    let mut params = None;
    let mut refusals = Vec::new();
    let mut failures = Vec::new();
    for (b, res) in in_sync.iter().zip(logins) {
        match res {
            Ok(l) => {
                if params.is_none() {
                    params = Some(l.params);
                }
                conns.push(l.conn);
            }
            Err(LoginError::Io(e)) => failures.push((b.clone(), e)),
            Err(LoginError::Refused(frame)) => refusals.push((b.clone(), frame)),
        }
    }
    // A refusal for resources (too many connections, out of memory, starting or shutting
    // down) is this login's outcome, not a fault of the server: the client gets it as it came.
    if let Some((_, frame)) = refusals.iter().find(|(_, f)| is_resource_refusal(f.body())) {
        tracing::info!(sqlstate = %message::error_fields(frame.body()).code, "a backend refused a login for lack of resources");
        client.write_all(&frame.data).await?;
        return Ok(None);
    }
    // A server that could not be reached is checked before it is judged: under a storm of
    // logins a healthy server can be slow to accept.
    for (b, e) in failures {
        match crate::cluster::check(&shared.cfg, &b).await {
            Ok(()) => return Err(SessionError::LoginFailed(b.name.clone(), e)),
            Err(check) => {
                shared.cluster.eject(b.idx, BackendState::Down, &format!("login failed: {e}; health check failed: {check}"));
            }
        }
    }
    if conns.is_empty() {
        // Every backend refused alike (no such database, say): the client gets the lead's own error.
        if let Some((_, frame)) = refusals.into_iter().next() {
            client.write_all(&frame.data).await?;
            return Ok(None);
        }
        return Err(SessionError::NoBackend("no backend accepted the login".into()));
    }
    for (b, frame) in refusals {
        // Others accepted this very login: this backend differs from them (a role or a
        // database missing on it alone).
        let f = message::error_fields(frame.body());
        shared.cluster.eject(
            b.idx,
            BackendState::Down,
            &format!("refused a login the others accepted: {} {}", f.code, f.message),
        );
    }
    let targets = conns.iter().map(|c| CancelTarget { addr: c.backend.addr.clone(), pid: c.key.0, secret: c.key.1 }).collect();
    let lead_pid = conns[0].key.0;
    let ((pid, secret), guard) = shared.cancels.register(lead_pid, targets);
    let mut out = BytesMut::with_capacity(512);
    message::auth_request(&mut out, message::AUTH_OK, &[]);
    for p in params.unwrap_or_default() {
        out.extend_from_slice(&p.data);
    }
    message::backend_key_data_msg(&mut out, pid, secret);
    message::ready_for_query(&mut out, b'I');
    client.write_all(&out).await?;
    tracing::debug!(user = %st.user, backends = conns.len(), "session started");
    let database = st.params.iter().find(|(k, _)| k == "database").map(|(_, v)| v.clone()).unwrap_or_else(|| st.user.clone());
    let lead = &conns[0].backend;
    let target =
        LoadTarget { host: lead.host.clone(), port: lead.port, user: st.user.clone(), password, database, tls: lead.tls.clone() };
    Ok(Some((conns, guard, target, st.params, epoch)))
}

impl Session {
    fn new(
        client: Stream,
        shared: Arc<Shared>,
        conns: Vec<BackendConn>,
        cancel: cancel::CancelGuard,
        target: LoadTarget,
        params: Vec<(String, String)>,
        epoch: u64,
    ) -> Session {
        let locks = shared.order.owner();
        let strict_default = conns.iter().any(|c| c.strict_default);
        let catalog = shared.catalogs.slot(&target.database);
        shared.catalogs.refresh(&catalog, target.clone());
        // A child token of its own: polling a cancellation future takes its token's mutex on
        // every turn of the loop, and the server's one token would be shared by every session.
        let shutdown = Box::pin(shared.stop.child_token().cancelled_owned());
        let max = shared.cfg.max_message_size;
        Session {
            client,
            cbuf: BytesMut::with_capacity(4096),
            client_out: OutQueue::default(),
            run: None,
            client_codec: FrameCodec::new(max),
            backend_codec: FrameCodec::new(BACKEND_MAX_MESSAGE),
            conns,
            pending: VecDeque::new(),
            next_seq: 1,
            router: Router::new(strict_default),
            locks,
            lock_wait: None,
            catalog,
            load_target: target,
            ddl_open: false,
            catalog_wait: None,
            last_status: b'I',
            timer: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(3600))),
            timer_at: None,
            last_client_activity: Instant::now(),
            shutdown,
            shutting_down: false,
            handing_over: false,
            answered_since_stop: false,
            requests_one: metrics::counter!("chorus_requests_total", "fanout" => "one"),
            requests_all: metrics::counter!("chorus_requests_total", "fanout" => "all"),
            errors: metrics::counter!("chorus_request_errors_total"),
            latency: metrics::histogram!("chorus_request_duration_seconds"),
            bytes_in: metrics::counter!("chorus_client_bytes_total", "direction" => "in"),
            bytes_out: metrics::counter!("chorus_client_bytes_total", "direction" => "out"),
            _cancel: cancel,
            id: NEXT_SESSION.fetch_add(1, Ordering::Relaxed),
            params,
            settings: state::Settings::default(),
            unit: state::Unit::default(),
            log_opened: 0,
            epoch,
            membership_wait: false,
            upgrade_due: false,
            stale_epoch: 0,
            checks: Vec::new(),
            stall_check: None,
            aborting: (0, 0),
            idle_wait: false,
            reconnect_due: false,
            history: None,
            unit_writes: false,
            unit_recorded: false,
            record_prepared: 0,
            recorded_upto: 0,
            wrap_open: false,
            wrap_held: None,
            shared,
        }
    }

    async fn run(mut self) {
        metrics::gauge!("chorus_sessions").increment(1.0);
        let end = self.event_loop().await;
        metrics::gauge!("chorus_sessions").decrement(1.0);
        if self.ddl_open {
            // Its transaction dies with the connections: what it did is undone, and the next
            // write looks at a catalog loaded after.
            self.ddl_open = false;
            self.catalog.ddl_ended(self.locks.holds(crate::order::Res::Global, crate::order::Mode::Exclusive));
            self.shared.catalogs.refresh(&self.catalog, self.load_target.clone());
        }
        if let Some(log) = self.shared.difflog.current().filter(|l| l.id == self.log_opened) {
            let mut b = BytesMut::new();
            Record::Close { session: self.id }.encode(&mut b);
            log.append(&b, 0);
        }
        if let End::Fatal(frame) = end {
            self.flush_run();
            self.client_out.push(frame.freeze());
        } else if let End::Error(e) = &end {
            if let Some(code) = e.sqlstate() {
                tracing::info!(sqlstate = code, error = %e, "ending session");
                self.flush_run();
                let mut buf = BytesMut::new();
                message::error_response(&mut buf, Severity::Fatal, code, &e.to_string());
                self.client_out.push(buf.freeze());
            }
        }
        // Best effort: let the last words reach the client.
        let deadline = tokio::time::sleep(std::time::Duration::from_secs(1));
        tokio::pin!(deadline);
        let _ = poll_fn(|cx| {
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            match self.client_out.poll_flush(&mut self.client, cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => Poll::Ready(()),
            }
        })
        .await;
        for c in &self.conns {
            c.stream.shutdown_now();
        }
    }

    async fn event_loop(&mut self) -> End {
        loop {
            let ev = poll_fn(|cx| self.poll_events(cx)).await;
            if let Err(end) = self.handle(ev) {
                return end;
            }
            // A loop: the membership may change again while the session connects (a join
            // attaches its newcomer and its donor one after the other).
            while self.upgrade_due {
                self.upgrade_due = false;
                if let Err(end) = self.join_new_backends().await {
                    return end;
                }
                // Route what waited for the new connections.
                if let Err(end) = self.on_client_data() {
                    return end;
                }
                self.flush_run();
            }
        }
    }

    /// Opens connections to backends that entered the in-sync set since this session logged
    /// in, and gives them the session's settings and named statements. Runs at an idle point
    /// (no request in flight, no transaction open on the backends), so the new backends start
    /// with exactly what the others hold.
    async fn join_new_backends(&mut self) -> Result<(), End> {
        let epoch = self.shared.cluster.epoch();
        let fresh: Vec<_> = self
            .shared
            .cluster
            .in_sync()
            .into_iter()
            .filter(|b| !self.conns.iter().any(|c| c.alive && c.backend.idx == b.idx))
            .collect();
        if !fresh.is_empty() {
            if let Some(why) = self.settings.unmovable {
                return Err(SessionError::Unmovable(why).into());
            }
        }
        let mut restore = self.settings.restore_frames(self.router.statement_frames());
        // A transaction that is open but has done nothing yet starts on the new backends too.
        restore.extend(self.unit.begin_only());
        let cfg = self.shared.cfg.clone();
        for b in fresh {
            let user = self.load_target.user.clone();
            let res = async {
                let login = fanout::connect(b.clone(), &self.params, &user, &self.load_target.password, cfg.connect_timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                let mut conn = login.conn;
                fanout::conn::run_script(&mut conn, &restore, cfg.connect_timeout).await?;
                Ok::<_, String>(conn)
            }
            .await;
            match res {
                Ok(conn) => {
                    tracing::debug!(backend = %b.name, "session joined a backend that entered the in-sync set");
                    self.router.learn_login_default(conn.strict_default);
                    // The backend's own old place when it had one (a reconnection keeps its
                    // priority); otherwise appended, never put in another backend's place: an
                    // index is a priority and the backends a session started with keep theirs.
                    if let Some(old) = self.conns.iter().position(|c| !c.alive && c.backend.idx == b.idx) {
                        self.conns[old] = conn;
                        self.record_prepared &= !(1u64 << old);
                        continue;
                    }
                    if self.conns.len() >= 64 {
                        return Err(SessionError::NoBackend("too many backend connections in one session".into()).into());
                    }
                    self.conns.push(conn);
                }
                Err(e) => match crate::cluster::check(&cfg, &b).await {
                    // The server is fine and this login alone failed (too many connections,
                    // say): the session cannot go on without the new member.
                    Ok(()) => return Err(SessionError::LoginFailed(b.name.clone(), e).into()),
                    Err(check) => {
                        let why = format!("a session could not log in: {e}; health check failed: {check}");
                        self.shared.cluster.eject(b.idx, BackendState::Down, &why);
                    }
                },
            }
        }
        self.epoch = epoch;
        self.membership_wait = false;
        // A 40001 meant for a transaction that did not write is void now.
        self.router.clear_fail_next();
        Ok(())
    }

    /// Routing waits for the requests in flight (a membership change, a COMMIT that needs
    /// the session idle, a reconnect, a wrapped write's COMMIT) and none is left.
    fn held_may_go(&self) -> bool {
        (self.membership_wait || self.idle_wait || self.reconnect_due || self.wrap_open) && self.pending.is_empty()
    }

    fn handle(&mut self, ev: Events) -> Result<(), End> {
        for (i, why) in ev.backend_failed {
            self.lost_conn(i, why, None)?;
        }
        for (i, healthy) in ev.checked {
            self.checked(i, healthy)?;
        }
        if ev.backend_data {
            self.on_backend_data()?;
            if self.held_may_go() {
                self.on_client_data()?;
            }
        }
        if ev.token {
            self.lock_wait = None;
        }
        if ev.client_data || ev.token {
            // The idle clock (it runs only while the session holds write locks) counts from
            // the client's last message, also when that message is the one taking the locks.
            self.last_client_activity = Instant::now();
            self.on_client_data()?;
        }
        if ev.client_eof {
            if self.cbuf.is_empty() {
                return Err(End::Quiet);
            }
            // A frame cut short, then the client left: nothing of it is forwarded.
            tracing::debug!(bytes = self.cbuf.len(), "client disconnected in the middle of a message");
            return Err(End::Quiet);
        }
        if ev.timer {
            self.on_timer()?;
        }
        // A request held until those in flight are answered goes once they are, whichever
        // event answered the last one: a reply, a backend's timeout (the timer), a lost
        // connection. (Found when a COMMIT waited for a stopped backend's timeout and then
        // for nothing, holding its locks.)
        if !ev.backend_data && self.held_may_go() && !self.cbuf.is_empty() {
            self.on_client_data()?;
        }
        if ev.shutdown {
            self.shutting_down = true;
            self.handing_over = self.shared.handing_over.is_cancelled();
        }
        if self.shared.deposed.is_cancelled() {
            // Another member leads now: nothing more of this session can commit anywhere.
            return Err(End::Fatal(deposed_frame()));
        }
        if self.shutting_down && self.pending.is_empty() && self.last_status == b'I' && !self.router.tx_open {
            if !self.handing_over {
                return Err(SessionError::ShuttingDown.into());
            }
            // A client that has just logged in, or is between the statements of a script,
            // is about to send its next one: it is not cut off mid-stride.
            if self.answered_since_stop || Instant::now() >= self.last_client_activity + DRAIN_GRACE {
                return Err(SessionError::HandingOver.into());
            }
        }
        self.flush_run();
        Ok(())
    }

    // ---- polling ---------------------------------------------------------------------------

    fn poll_events(&mut self, cx: &mut Context<'_>) -> Poll<Events> {
        let mut ev = Events::default();
        if let Poll::Ready(Err(_)) = self.client_out.poll_flush(&mut self.client, cx) {
            ev.client_eof = true;
            return Poll::Ready(ev);
        }
        let mut stalled = false;
        for (i, c) in self.conns.iter_mut().enumerate() {
            if c.alive {
                let before = c.out.len();
                if let Poll::Ready(Err(e)) = c.out.poll_flush(&mut c.stream, cx) {
                    ev.backend_failed.push((i, format!("write failed: {e}")));
                }
                // The clock is read only while a backend holds the session back.
                if c.out.len() >= BACKEND_OUT_HIGH {
                    if c.stalled_since.is_none() || c.out.len() < before {
                        c.stalled_since = Some(Instant::now());
                    }
                    stalled = true;
                } else {
                    c.stalled_since = None;
                }
            }
        }
        if stalled && self.stall_check.is_none() {
            self.stall_check = Some(Instant::now() + self.shared.cfg.health_check_interval);
        }
        if let Some(since) = self.lock_wait {
            match self.router.retry_locks(&mut self.locks, cx.waker()) {
                Acquire::Wait => {}
                Acquire::Granted => ev.token = true,
                Acquire::Deadlock => {
                    self.router.deadlocked();
                    ev.token = true;
                }
            }
            if ev.token {
                metrics::histogram!("chorus_write_order_wait_seconds").record(since.elapsed().as_secs_f64());
            }
        }
        let backends_drained = !stalled;
        let client_ok = self.client_out.len() < CLIENT_OUT_HIGH;
        if let Some((_, wake)) = &mut self.catalog_wait {
            if wake.as_mut().poll(cx).is_ready() || self.catalog.get().is_some() {
                self.catalog_wait = None;
                ev.token = true;
            }
        }
        self.checks.retain_mut(|(i, fut, healthy)| match fut.as_mut().poll(cx) {
            Poll::Ready(()) => {
                ev.checked.push((*i, healthy.load(Ordering::Acquire)));
                false
            }
            Poll::Pending => true,
        });
        if self.lock_wait.is_none()
            && self.catalog_wait.is_none()
            && !self.membership_wait
            && !self.idle_wait
            && self.checks.is_empty()
            && backends_drained
            && client_ok
        {
            self.client_codec.reserve_for_partial(&mut self.cbuf);
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.client), cx, &mut self.cbuf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => ev.client_eof = true,
                Poll::Ready(Ok(n)) => {
                    self.bytes_in.increment(n as u64);
                    ev.client_data = true;
                }
                Poll::Pending => {}
            }
        }
        if client_ok {
            for (i, c) in self.conns.iter_mut().enumerate() {
                if !c.alive || ev.backend_failed.iter().any(|(j, _)| *j == i) {
                    continue;
                }
                let has_frame = matches!(self.backend_codec.peek(&c.rbuf), Ok(Some(_)));
                if has_frame && c.rbuf.len() >= BACKEND_IN_HIGH {
                    continue;
                }
                self.backend_codec.reserve_for_partial(&mut c.rbuf);
                match tokio_util::io::poll_read_buf(Pin::new(&mut c.stream), cx, &mut c.rbuf) {
                    Poll::Ready(Ok(0)) => ev.backend_failed.push((i, "backend closed the connection".into())),
                    Poll::Ready(Err(e)) => ev.backend_failed.push((i, format!("read failed: {e}"))),
                    Poll::Ready(Ok(_)) => ev.backend_data = true,
                    Poll::Pending => {}
                }
            }
        }
        if let Some(at) = self.deadline() {
            if self.timer_at != Some(at) {
                self.timer.as_mut().reset(at.into());
                self.timer_at = Some(at);
            }
            if self.timer.as_mut().poll(cx).is_ready() {
                self.timer_at = None;
                ev.timer = true;
            }
        }
        if !self.shutting_down && self.shutdown.as_mut().poll(cx).is_ready() {
            ev.shutdown = true;
        }
        if ev.any() {
            Poll::Ready(ev)
        } else {
            Poll::Pending
        }
    }

    /// The next moment something times out: an idle transaction holding locks, a wait for
    /// locks, or a backend lagging behind the others on the current request.
    fn deadline(&self) -> Option<Instant> {
        let cfg = &self.shared.cfg;
        let idle = (self.locks.holds_any() && self.pending.is_empty() && self.lock_wait.is_none())
            .then(|| self.last_client_activity + cfg.idle_in_transaction_timeout);
        let lag = self.pending.front().and_then(|r| r.first_done_at).map(|t| t + cfg.backend_timeout);
        let wait = self.lock_wait.map(|t| t + cfg.lock_timeout);
        let cat = self.catalog_wait.as_ref().map(|(t, _)| *t + cfg.lock_timeout);
        let stall = self.conns.iter().filter_map(|c| c.stalled_since).min().map(|t| t + cfg.backend_timeout);
        let drain = (self.handing_over && !self.answered_since_stop).then(|| self.last_client_activity + DRAIN_GRACE);
        [idle, lag, wait, cat, stall, self.stall_check, drain].into_iter().flatten().min()
    }

    fn on_timer(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let cfg = self.shared.cfg.clone();
        if self.locks.holds_any()
            && self.pending.is_empty()
            && self.lock_wait.is_none()
            && now >= self.last_client_activity + cfg.idle_in_transaction_timeout
        {
            return Err(SessionError::IdleInTransaction(cfg.idle_in_transaction_timeout).into());
        }
        if self.catalog_wait.as_ref().is_some_and(|(t, _)| now >= *t + cfg.lock_timeout) {
            self.catalog_wait = None;
            let why =
                self.catalog.last_error.lock().map(|e| e.clone()).unwrap_or_default().unwrap_or_else(|| "still loading".into());
            self.router.fail_next(
                "55000",
                format!("Chorus has no current catalog of database {} to analyse this write ({why})", self.load_target.database),
            );
            self.on_client_data()?;
        }
        if self.lock_wait.is_some_and(|t| now >= t + cfg.lock_timeout) {
            self.locks.cancel_wait();
            self.lock_wait = None;
            self.router.fail_next(
                "55P03",
                format!("lock timeout: waited {:?} (lock_timeout) for Chorus's write locks", cfg.lock_timeout),
            );
            self.on_client_data()?;
        }
        self.on_stall_timer(now)?;
        let laggards = match self.pending.front() {
            Some(r) if r.first_done_at.is_some_and(|t| now >= t + cfg.backend_timeout) => r.remaining,
            _ => 0,
        };
        for i in bits(laggards) {
            let why = format!("no reply within backend_timeout ({:?}) after another backend answered", cfg.backend_timeout);
            self.fail_conn(i, &why, true)?;
        }
        Ok(())
    }

    /// A backend that takes no more of what the session queued for it (a COPY streaming into
    /// a stopped server, say) holds the session back: it is dropped once the health check
    /// took it out of the in-sync set, and ejected when it made no progress for
    /// `backend_timeout` while another backend kept taking its frames.
    fn on_stall_timer(&mut self, now: Instant) -> Result<(), End> {
        let stalled: Vec<usize> =
            (0..self.conns.len()).filter(|&i| self.conns[i].alive && self.conns[i].stalled_since.is_some()).collect();
        if stalled.is_empty() {
            self.stall_check = None;
            return Ok(());
        }
        let timeout = self.shared.cfg.backend_timeout;
        let moving = self.conns.iter().any(|c| c.alive && c.stalled_since.is_none());
        for i in stalled {
            if !self.conns[i].backend.is_in_sync() {
                self.fail_conn(i, "backend left the in-sync set", false)?;
            } else if moving && self.conns[i].stalled_since.is_some_and(|t| now >= t + timeout) {
                let why = format!("took none of the frames queued for it for backend_timeout ({timeout:?}) while the others did");
                self.fail_conn(i, &why, true)?;
            }
        }
        let still = self.conns.iter().any(|c| c.alive && c.stalled_since.is_some());
        self.stall_check = still.then(|| now + self.shared.cfg.health_check_interval);
        Ok(())
    }

    // ---- client side -----------------------------------------------------------------------

    fn on_client_data(&mut self) -> Result<(), End> {
        let waker = futures::task::noop_waker();
        loop {
            if self.lock_wait.is_some() || self.catalog_wait.is_some() || self.upgrade_due || !self.checks.is_empty() {
                return Ok(());
            }
            if self.idle_wait {
                if !self.pending.is_empty() {
                    return Ok(());
                }
                self.idle_wait = false;
            }
            if self.wrap_open && !self.router.copy_in_progress() && !self.router.batch_open() {
                if !self.pending.is_empty() {
                    return Ok(());
                }
                self.wrap_open = false;
            }
            if self.reconnect_due && !self.router.tx_open && self.last_status == b'I' {
                // Outside a transaction nothing is routed without every in-sync backend.
                if self.pending.is_empty() {
                    self.reconnect_due = false;
                    self.membership_wait = true;
                    self.upgrade_due = true;
                }
                return Ok(());
            }
            if self.shared.cluster.epoch() != self.epoch && !self.membership_changed() {
                return Ok(());
            }
            self.refresh_conns()?;
            let alive = self.alive_mask();
            let mut ctx = RouteCtx {
                alive,
                conns: &self.conns,
                policy: self.shared.cfg.read_policy,
                read_capacity: self.shared.cfg.read_capacity,
                catalog_slot: &self.catalog,
                ddl_open: self.ddl_open,
                catalog_cache: None,
                db: self.catalog.id,
                locks: &mut self.locks,
                // The real waker is registered when poll_events asks again.
                waker: &waker,
                allow_unsafe: self.shared.cfg.unsafe_statements == UnsafeStatements::Allow,
                idle: self.pending.is_empty(),
                record_due: self.history.is_some() && self.unit_writes && !self.unit_recorded && self.last_status == b'T',
            };
            let (open_before, ends_before, queued) = (self.router.tx_open, self.router.tx_ends, self.pending.len());
            let d = self.router.next(&mut self.cbuf, &self.client_codec, &mut ctx, &mut self.next_seq)?;
            let Some(d) = d else { return Ok(()) };
            let in_block = open_before && self.router.tx_open && self.router.tx_ends == ends_before;
            match d {
                Dispatch::NeedsLocks => {
                    self.lock_wait = Some(Instant::now());
                    return Ok(());
                }
                Dispatch::NeedsIdle => {
                    self.idle_wait = true;
                    return Ok(());
                }
                Dispatch::Record => {
                    let _ = self.record_unit(crate::history::Shape::Transaction);
                }
                Dispatch::NeedsCatalog => {
                    let slot = self.catalog.clone();
                    let mut wake: Wakeup = Box::pin(async move { slot.loaded.notified().await });
                    // Registered before the check below, so a load finishing now is not missed.
                    let _ = wake.as_mut().poll(&mut Context::from_waker(&waker));
                    self.shared.catalogs.refresh(&self.catalog, self.load_target.clone());
                    if self.catalog.get().is_some() {
                        continue;
                    }
                    self.catalog_wait = Some((Instant::now(), wake));
                    return Ok(());
                }
                Dispatch::Terminate => return Err(End::Quiet),
                Dispatch::Reply(bytes) => self.forward_static(bytes),
                Dispatch::Ignored => {}
                Dispatch::Inject { bytes, targets, request } => {
                    self.dispatch(bytes, targets, request)?;
                    if let Some(r) = self.pending.back_mut() {
                        r.inject = true;
                        r.own_error = true;
                    }
                }
                Dispatch::Send { bytes, targets, request } => self.dispatch(bytes, targets, request)?,
            }
            if in_block {
                for r in self.pending.iter_mut().skip(queued) {
                    r.in_block = true;
                }
            }
        }
    }

    /// Queues `bytes` for the `targets` backends; `request`, if any, is remembered until its
    /// reply is complete.
    fn dispatch(&mut self, bytes: Bytes, targets: u64, request: Option<route::NewRequest>) -> Result<(), End> {
        if targets == 0 {
            return Err(SessionError::NoBackend("every backend of this session has left the in-sync set".into()).into());
        }
        let wrap = request.as_ref().and_then(|r| r.begin_seq.filter(|_| self.should_wrap(r)));
        if let Some(begin_seq) = wrap {
            self.open_wrap(begin_seq, targets)?;
        }
        if let Some(r) = request {
            // A write outside a transaction runs (begin_seq); a batch that only prepares one
            // does not.
            self.unit_writes |= r.writes && (r.begin_seq.is_some() || self.router.tx_open);
            if r.ddl && !self.ddl_open {
                self.ddl_open = true;
            }
            for i in bits(r.targets) {
                self.conns[i].queue.push_back(r.seq);
                self.conns[i].backend.inflight.fetch_add(1, Ordering::Relaxed);
            }
            if r.targets.count_ones() > 1 { &self.requests_all } else { &self.requests_one }.increment(1);
            if r.signals {
                self.signal_sent(&bytes, r.targets);
            }
            self.pending.push_back(Request {
                seq: r.seq,
                targets: r.targets,
                remaining: r.targets,
                primary: None,
                primary_done: r.internal,
                forwarded: 0,
                rfq_sent: r.internal,
                writes: r.writes,
                hash_rows: r.hash_rows,
                per_server: r.per_server,
                lead_answers: r.lead_answers,
                signals: r.signals,
                cancel_spread: false,
                own_error: is_own_error(&r.sql),
                inject: false,
                held: Vec::new(),
                internal: r.internal,
                wrapped: false,
                quiet: false,
                record: false,
                trims: r.trims.into(),
                lead_read: self.router.is_lead_read(r.seq),
                in_block: false,
                sql: r.sql,
                retry: r.retry,
                again: (r.targets.count_ones() > 1 && !r.internal && !self.router.tx_open && !self.router.copy_in_progress())
                    .then(|| bytes.clone()),
                expect: None,
                gave_up: 0,
                first_done_at: None,
                sent_at: Instant::now(),
            });
            if r.logged {
                self.settings.observe(&bytes);
            }
            if !r.internal {
                self.note_record_statement_drop(&bytes);
            }
            self.unit.request(r.seq, r.hash_rows, r.logged, r.logged_as.as_ref().unwrap_or(&bytes), self.shared.difflog.active());
            if wrap.is_some() {
                if let Some(p) = self.pending.back_mut() {
                    p.wrapped = true;
                    p.rfq_sent = true;
                }
                self.wrap_open = true;
            }
        } else {
            self.unit.more(&bytes, self.shared.difflog.active());
            // The rest of an extended batch (COPY data is no statement).
            if !self.router.copy_in_progress() {
                self.note_record_statement_drop(&bytes);
            }
        }
        for i in bits(targets) {
            self.conns[i].out.push(bytes.clone());
        }
        Ok(())
    }

    /// Backends joined the in-sync set. Returns whether routing may go on now: a session in
    /// an open transaction goes on with its backends (a write in it fails with 40001, since
    /// the new backends lack the transaction); otherwise it waits for its requests to finish
    /// and then connects to the new backends.
    fn membership_changed(&mut self) -> bool {
        let epoch = self.shared.cluster.epoch();
        let just_begun = self.pending.is_empty() && self.unit.begin_only().is_some();
        if (self.router.backend_tx_open() || self.last_status != b'I') && !just_begun {
            if self.stale_epoch != epoch {
                self.stale_epoch = epoch;
                self.router.fail_next(
                    "40001",
                    "could not serialize access: a backend joined the cluster during this transaction; retry it".into(),
                );
            }
            return true;
        }
        self.membership_wait = true;
        if self.pending.is_empty() {
            self.upgrade_due = true;
        }
        false
    }

    fn alive_mask(&self) -> u64 {
        self.conns.iter().enumerate().filter(|(_, c)| c.alive).fold(0, |m, (i, _)| m | 1 << i)
    }

    /// The session's lead: its highest-priority live connection.
    fn lead(&self) -> Option<usize> {
        self.conns.iter().position(|c| c.alive)
    }

    /// Drops connections to backends that left the in-sync set since the last request.
    fn refresh_conns(&mut self) -> Result<(), End> {
        for i in 0..self.conns.len() {
            if self.conns[i].alive && !self.conns[i].backend.is_in_sync() {
                self.fail_conn(i, "backend left the in-sync set", false)?;
            }
        }
        Ok(())
    }

    // ---- backend side ----------------------------------------------------------------------

    fn on_backend_data(&mut self) -> Result<(), End> {
        loop {
            let mut progress = false;
            for i in 0..self.conns.len() {
                progress |= self.drain_conn(i)?;
            }
            if !progress {
                return Ok(());
            }
        }
    }

    /// Handles the frames of connection `i` that can be handled now. Returns whether any was.
    fn drain_conn(&mut self, i: usize) -> Result<bool, End> {
        let mut progress = false;
        while self.conns[i].alive {
            let (tag, len) = match self.backend_codec.peek(&self.conns[i].rbuf) {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    self.fail_conn(i, &format!("protocol error: {e}"), true)?;
                    break;
                }
            };
            let current = self.conns[i].queue.front().copied();
            let head = self.pending.front().map(|r| r.seq);
            if current.is_some() && current != head {
                break; // this backend is ahead: its reply waits for the requests before it
            }
            if message::is_async_backend_message(tag) {
                let frame = self.conns[i].rbuf.split_to(len);
                let forward = match tag {
                    message::NOTIFICATION_RESPONSE => Some(i) == self.lead(),
                    // A notice can be the first thing a reply holds: it may pick the primary.
                    _ if current.is_some() => self.claim_primary(i),
                    _ => Some(i) == self.lead() && self.pending.is_empty(),
                };
                if forward {
                    self.forward(frame);
                }
                progress = true;
                continue;
            }
            if tag == message::ERROR_RESPONSE {
                let body = &self.conns[i].rbuf[5..len];
                let f = message::error_fields(body);
                if f.severity == "FATAL" || f.severity == "PANIC" {
                    let why = format!("backend ended the connection: {} {}", f.code, f.message);
                    let frame = self.conns[i].rbuf.split_to(len);
                    self.conns[i].rbuf.clear();
                    self.lost_conn(i, why, Some(frame))?;
                    return Ok(true);
                }
                // A query cancelled by a client's pg_cancel_backend (not a statement timeout).
                if let Some(seq) = current.filter(|_| f.code == "57014" && f.message.contains("user request")) {
                    self.spread_cancel(i, seq);
                }
            }
            if current.is_none() {
                self.conns[i].rbuf.clear();
                self.fail_conn(i, &format!("unexpected message '{}' outside any request", tag as char), true)?;
                return Ok(true);
            }
            let alive = if tag == message::ERROR_RESPONSE { self.alive_mask() } else { 0 };
            let Some(req) = self.pending.front_mut() else {
                break;
            };
            let pos = self.conns[i].pos;
            let frame;
            if pos < req.forwarded || (req.primary_done && req.primary != Some(i)) {
                // Already delivered by the primary (or the primary is done): compare only.
                frame = self.conns[i].rbuf.split_to(len);
                self.conns[i].outcome.record(tag, &frame[5..]);
                if req.hash_rows && tag == message::DATA_ROW {
                    self.conns[i].outcome.hash_row(&frame[5..]);
                }
            } else if req.primary == Some(i) || (req.primary.is_none() && may_lead(req, &self.conns, i)) {
                match self.take_primary_frame(i, tag, len, alive) {
                    Flow::Next => {
                        progress = true;
                        continue;
                    }
                    Flow::Stop => break,
                    Flow::ReadyForQuery => {}
                }
            } else {
                break; // a secondary caught up with the primary: wait for the primary
            }
            self.conns[i].pos += 1;
            progress = true;
            if tag == message::READY_FOR_QUERY {
                self.finish_conn_request(i);
                if self.pending.front().is_some_and(|r| r.remaining == 0) {
                    self.complete_head()?;
                }
            }
        }
        Ok(progress)
    }

    /// The next frame of connection `i`, the primary (or becoming it) of the oldest request:
    /// forwarded to the client, held back, or given up for another backend to answer.
    fn take_primary_frame(&mut self, i: usize, tag: u8, len: usize, alive: u64) -> Flow {
        let Some(req) = self.pending.front_mut() else { return Flow::Stop };
        let pos = self.conns[i].pos;
        if tag == message::ERROR_RESPONSE && req.again.is_some() && pos == req.forwarded {
            // A timing-dependent error while another backend may still succeed: that
            // one answers the client, and this one runs the statement again after.
            let code = message::error_code(&self.conns[i].rbuf[5..len]);
            let others = req.remaining & !(1u64 << i) & !req.gave_up & alive;
            if others != 0 && TIMING_SQLSTATES.contains(&&code) {
                req.gave_up |= 1u64 << i;
                req.primary = None;
                let frame = self.conns[i].rbuf.split_to(len);
                self.conns[i].outcome.record(tag, &frame[5..]);
                self.conns[i].pos += 1;
                return Flow::Next;
            }
        }
        let Some(req) = self.pending.front_mut() else { return Flow::Stop };
        req.primary = Some(i);
        let mut frame = self.conns[i].rbuf.split_to(len);
        self.conns[i].outcome.record(tag, &frame[5..]);
        if req.hash_rows && tag == message::DATA_ROW {
            self.conns[i].outcome.hash_row(&frame[5..]);
        }
        if req.inject && (tag == message::PARSE_COMPLETE || tag == message::BIND_COMPLETE) {
            req.held.push(frame);
            self.conns[i].pos += 1;
            return Flow::Next;
        }
        if !req.held.is_empty() {
            // Chorus's error follows its own ParseComplete and BindComplete: those go.
            let ours = tag == message::ERROR_RESPONSE && message::raised_in_do_block(&frame[5..]);
            let held = std::mem::take(&mut req.held);
            req.forwarded += held.len() as u32;
            if !ours {
                for f in held {
                    self.forward(f);
                }
            }
        }
        let Some(req) = self.pending.front_mut() else { return Flow::Stop };
        if tag == message::ERROR_RESPONSE && req.own_error {
            let mut f = BytesMut::new();
            message::error_without_context(&mut f, &frame[5..]);
            frame = f;
        }
        if tag == message::PARAMETER_DESCRIPTION && !req.trims.is_empty() {
            if let Some(Some(keep)) = req.trims.pop_front() {
                let mut f = BytesMut::new();
                message::trim_parameter_description(&mut f, &frame[5..], keep as usize);
                frame = f;
            }
        }
        if tag == message::READY_FOR_QUERY {
            let status = message::ready_status(&frame[5..]);
            req.primary_done = true;
            if req.targets.count_ones() > 1 {
                req.first_done_at.get_or_insert_with(Instant::now);
            }
            // Commit points wait for every backend unless commit_ack = "first".
            // A wrapped write's reply goes with its COMMIT's outcome, and the ReadyForQuery of
            // a unit still to be recorded with its record, in finish_request.
            let hold = req.quiet
                || (status == b'I' && self.history.is_some() && self.unit_writes && !self.unit_recorded)
                || (self.shared.cfg.commit_ack == CommitAck::All
                    && req.targets.count_ones() > 1
                    && (req.writes || self.locks.holds_any())
                    && status == b'I');
            if !hold && !req.rfq_sent {
                req.rfq_sent = true;
                self.forward_static(rfq(status));
            }
        } else {
            req.forwarded += 1;
            // Chorus's COMMIT: its Close, Parse, Bind and command tag are not the client's.
            let own = matches!(
                tag,
                message::COMMAND_COMPLETE | message::CLOSE_COMPLETE | message::PARSE_COMPLETE | message::BIND_COMPLETE
            );
            // From its first command tag on, the reply waits for Chorus's COMMIT (rows and COPY
            // go on): the client hears of a write once it has committed. Not while the batch
            // still awaits its Sync: there PostgreSQL too sends each command tag as its Execute
            // completes and commits at the Sync (a failed commit is an ErrorResponse after
            // them), and a pipeline reads them before it sends the Sync.
            let awaits_sync = self.router.open_batch() == Some(req.seq);
            let hold =
                self.wrap_held.is_some() || (!awaits_sync && matches!(tag, message::COMMAND_COMPLETE | message::ERROR_RESPONSE));
            if req.wrapped && hold {
                match &mut self.wrap_held {
                    Some(h) => h.unsplit(frame),
                    None => self.wrap_held = Some(frame),
                }
            } else if !(req.quiet && own) {
                self.forward(frame);
            }
            self.conns[i].pos += 1;
            return Flow::Next;
        }
        Flow::ReadyForQuery
    }

    /// Whether connection `i` is (or now becomes) the primary of the oldest request.
    fn claim_primary(&mut self, i: usize) -> bool {
        let Some(req) = self.pending.front_mut() else { return false };
        if req.internal {
            return false;
        }
        if req.primary.is_none() && may_lead(req, &self.conns, i) {
            req.primary = Some(i);
        }
        req.primary == Some(i)
    }

    /// Connection `i` has answered its oldest request in full.
    fn finish_conn_request(&mut self, i: usize) {
        let c = &mut self.conns[i];
        c.queue.pop_front();
        c.pos = 0;
        c.backend.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(req) = self.pending.front_mut() {
            req.remaining &= !(1 << i);
            if req.remaining != 0 {
                // Others still work on it: the lag clock starts.
                req.first_done_at.get_or_insert_with(Instant::now);
            }
        }
    }

    /// Every target has answered the oldest request: compare, eject losers, release the reply.
    fn complete_head(&mut self) -> Result<(), End> {
        let Some(mut req) = self.pending.pop_front() else {
            return Ok(());
        };
        if req.signals {
            self.signal_answered(req.targets);
        }
        self.settle_at_risk(&req)?;
        if self.router.request_done(req.seq) {
            // The snapshot is taken on every backend: writers may go on.
            let keep = self.locks.holds_data_locks().then_some(crate::order::Mode::IntentExclusive);
            self.locks.downgrade(crate::order::Res::Global, keep);
        }
        // Requests sent before Chorus's abort of a transaction (`timing_split`) are not
        // compared on the connections it aborts; nothing after it is spared.
        let (aborting, abort_seq) = self.aborting;
        if abort_seq != 0 && req.seq >= abort_seq {
            self.aborting = (0, 0);
        }
        let skip = if req.seq < abort_seq && req.targets & !aborting != 0 { aborting } else { 0 };
        // The common case, one target, needs no vote and no allocation.
        if req.targets.count_ones() == 1 {
            let i = req.targets.trailing_zeros() as usize;
            let c = &mut self.conns[i];
            let o = std::mem::replace(&mut c.outcome, Outcome::new());
            if !c.alive {
                return Err(SessionError::NoBackend("the backend serving the request failed".into()).into());
            }
            self.finish_request(&req, o);
            return Ok(());
        }
        let mut finished: Vec<(usize, Outcome)> = Vec::with_capacity(req.targets.count_ones() as usize);
        for i in bits(req.targets) {
            let c = &mut self.conns[i];
            let o = std::mem::replace(&mut c.outcome, Outcome::new());
            if c.alive && skip & (1u64 << i) == 0 {
                finished.push((i, if req.per_server { o.success_only() } else { o }));
            }
        }
        if finished.is_empty() {
            return Err(SessionError::NoBackend("every backend serving the request failed".into()).into());
        }
        if let Some(w) = req.expect {
            // A second run: a backend that fails it again leaves.
            self.finish_request(&req, w);
            for (i, o) in finished.iter().filter(|(_, o)| *o != w) {
                let why = format!("failed a statement twice that the others completed ({o}; the others: {w})");
                self.shared.cluster.eject(self.conns[*i].backend.idx, BackendState::Down, &why);
                self.fail_conn(*i, &why, false)?;
            }
            return Ok(());
        }
        if req.record && finished.iter().any(|(_, o)| o.error == Some(FENCED)) {
            // A newer leader raised the epoch on some backend: no backend disagrees, this
            // instance is deposed. The session ends; its unit committed nowhere, or where the
            // raise had not come yet (the new leader's recovery completes it everywhere).
            metrics::counter!("chorus_ha_fenced_units_total").increment(1);
            self.shared.depose("a backend refused a unit's record: its epoch was raised by a newer leader");
            return Err(End::Fatal(deposed_frame()));
        }
        let v = vote(&finished);
        if !v.losers.is_empty() && self.timing_split(&mut req, &finished)? {
            return Ok(());
        }
        self.finish_request(&req, v.winner);
        for &loser in &v.losers {
            let theirs = finished.iter().find(|(j, _)| *j == loser).map(|(_, o)| *o).unwrap_or_default();
            let sql = statement_text(&req.sql);
            let why = format!("outcome differs from the majority on {sql:?}: this backend: {theirs}; majority: {}", v.winner);
            tracing::error!(backend = %self.conns[loser].backend.name, statement = %sql, theirs = %theirs, majority = %v.winner, "backend diverged");
            tracing::debug!(statement = %statement_text_raw(&req.sql), "the diverged statement as sent");
            if self.shared.cluster.eject(self.conns[loser].backend.idx, BackendState::Diverged, &why) {
                metrics::counter!("chorus_divergences_total").increment(1);
            }
            // Requests pipelined behind this one go on without the loser.
            self.fail_conn(loser, &why, false)?;
        }
        Ok(())
    }

    /// Backends disagree only because some gave a timing-dependent error (57014, 55P03, 40001,
    /// 40P01) where the others succeeded: no backend failed. Outside a transaction the
    /// statement runs again on those backends, under the same locks, and the client's
    /// ReadyForQuery waits for it; inside one, the transaction is aborted on the backends where
    /// it went on, so that every backend holds the same aborted transaction. Returns whether
    /// it handled the request (false: an ordinary disagreement).
    fn timing_split(&mut self, req: &mut Request, finished: &[(usize, Outcome)]) -> Result<bool, End> {
        type Group<'a> = Vec<&'a (usize, Outcome)>;
        let (failed, rest): (Group, Group) =
            finished.iter().partition(|(_, o)| o.error.is_some_and(|c| TIMING_SQLSTATES.contains(&&c)));
        let Some(&&(_, ok)) = rest.first() else { return Ok(false) };
        // Outside a transaction, requests pipelined behind it would run before the second run:
        // no reordering. Inside one, what follows meets an aborted transaction everywhere once
        // the abort below is in; a client that pipelines further data statements into it
        // may see the backends differ on them.
        let pipelined = !self.pending.is_empty() && ok.status == b'I';
        if failed.is_empty() || rest.iter().any(|(_, o)| *o != ok) || pipelined {
            return Ok(false);
        }
        let failed_mask = failed.iter().fold(0u64, |m, (i, _)| m | 1 << i);
        let code = failed[0].1.error.unwrap_or(*b"57014");
        let sql = statement_text(&req.sql);
        let again = req.again.clone().filter(|_| ok.status == b'I' || req.wrapped);
        let (targets, bytes, expect, winner) = match again {
            Some(bytes) => (failed_mask, bytes, Some(ok), ok),
            None if ok.status != b'I' => {
                let ok_mask = rest.iter().fold(0u64, |m, (i, _)| m | 1 << i);
                let stmt = crate::sql::rewrite::error_statement(
                    std::str::from_utf8(&code).unwrap_or("57014"),
                    "the transaction failed on another backend of the cluster",
                );
                let mut q = BytesMut::new();
                message::query_msg(&mut q, &stmt);
                (ok_mask, q.freeze(), None, failed[0].1)
            }
            None => return Ok(false),
        };
        tracing::info!(statement = %sql, sqlstate = %String::from_utf8_lossy(&code), second_run = expect.is_some(), "a timing-dependent error on some backends only");
        metrics::counter!("chorus_timing_splits_total").increment(1);
        if req.wrapped && expect.is_some() {
            // Chorus's transaction around the write is aborted there: a new one first.
            for again in [crate::history::rollback_frame(), crate::history::begin_frame()] {
                let seq = self.send_own(targets, &again);
                self.pending.push_back(Request::internal(seq, targets, again));
            }
        }
        let seq = self.send_own(targets, &bytes);
        let client_rfq_waits = expect.is_some() && !req.rfq_sent;
        if expect.is_none() {
            self.aborting = (targets, seq);
        }
        self.pending.push_back(Request {
            // The second run's ReadyForQuery is the client's.
            rfq_sent: !client_rfq_waits,
            writes: req.writes,
            hash_rows: req.hash_rows,
            per_server: req.per_server,
            expect,
            ..Request::internal(seq, targets, req.sql.clone())
        });
        if client_rfq_waits {
            req.rfq_sent = true;
        }
        self.finish_request(req, winner);
        Ok(true)
    }

    /// Releases a completed request's ReadyForQuery with the winning status, and the write
    /// order once the transaction is over.
    fn finish_request(&mut self, req: &Request, winner: Outcome) {
        if req.quiet {
            // The wrapped write's reply, unless its COMMIT failed (that error went already).
            if let Some(held) = self.wrap_held.take().filter(|_| winner.error.is_none()) {
                self.forward(held);
            }
        }
        self.unit.outcome(req.seq, winner);
        if req.record {
            if winner.error.is_some() {
                self.record_prepared = 0;
                self.tell_record_failed(winner);
            } else {
                self.record_prepared |= req.targets;
            }
        }
        // A unit that completed unrecorded is recorded right after, its locks held until
        // then; the client's ReadyForQuery waits for the record, so its next unit cannot
        // take locks while this one's are still held.
        let standalone = self.pending.is_empty() && winner.status == b'I' && self.standalone_record_due();
        if !req.rfq_sent && !standalone {
            self.forward_static(rfq(winner.status));
        }
        if !req.internal {
            self.latency.record(req.sent_at.elapsed().as_secs_f64());
            if winner.error.is_some() {
                self.errors.increment(1);
            }
        }
        self.last_status = winner.status;
        if self.shutting_down && !req.internal {
            self.answered_since_stop = true;
        }
        if req.wrapped {
            self.close_wrap(req, winner);
        }
        if req.lead_read && winner.status == b'E' {
            self.follow_lead_abort(req);
        }
        if self.pending.is_empty() {
            self.router.settle(winner.status);
            if standalone {
                if self.record_unit(crate::history::Shape::Standalone) {
                    if let Some(p) = self.pending.back_mut() {
                        p.rfq_sent = req.rfq_sent;
                    }
                    return;
                }
                if !req.rfq_sent {
                    self.forward_static(rfq(winner.status));
                }
            }
            if winner.status == b'I' {
                self.unit_writes = false;
                self.unit_recorded = false;
                self.recorded_upto = 0;
                // The unit of work is over: to the diff log while its locks still hold, so
                // conflicting transactions are logged in the order they committed.
                self.log_unit();
                self.settings.unit_ended(!self.unit.rolled_back());
                self.router.commit_statements();
                self.unit.clear();
                // The catalog is stale before a write waiting for this unit's locks may run.
                if self.ddl_open {
                    self.ddl_open = false;
                    self.catalog.ddl_ended(self.locks.holds(crate::order::Res::Global, crate::order::Mode::Exclusive));
                    self.shared.catalogs.refresh(&self.catalog, self.load_target.clone());
                }
                // The commit point completed everywhere: strict two-phase locking ends here.
                self.locks.release_all();
            }
        }
    }

    /// Appends the finished unit to the diff log of a join under way (with, the first time, how
    /// to rebuild this session's state as of the unit's start).
    fn log_unit(&mut self) {
        if self.unit.is_empty() {
            return;
        }
        let Some(log) = self.shared.difflog.current() else { return };
        if self.unit.overflow {
            log.fail("a unit of work bigger than 1 MB was under way when the join started logging".into());
            return;
        }
        let mut buf = BytesMut::new();
        if self.log_opened != log.id {
            let mut restore = self.settings.restore_frames(self.router.statement_frames());
            // A transaction that is open but has done nothing yet starts on the new backends too.
            restore.extend(self.unit.begin_only());
            let open =
                Record::Open { session: self.id, user: self.load_target.user.clone(), params: self.params.clone(), restore };
            open.encode(&mut buf);
            self.log_opened = log.id;
        }
        self.unit.take_record(self.id, self.locks.summary(self.ddl_open)).encode(&mut buf);
        log.append(&buf, 1);
    }

    /// Marks connection `i` failed; if `eject`, the backend leaves the in-sync set as `down`.
    /// Requests it was serving continue on the other targets.
    fn fail_conn(&mut self, i: usize, why: &str, eject: bool) -> Result<(), End> {
        if !self.conns[i].alive {
            return Ok(());
        }
        if eject && !self.shutting_down {
            self.shared.cluster.eject(self.conns[i].backend.idx, BackendState::Down, why);
        }
        tracing::debug!(backend = %self.conns[i].backend.name, reason = %why, "session lost a backend connection");
        self.close_conn(i);
        self.release_requests(i, why)
    }

    /// Connection `i` is closed: the requests it was serving go on with the other targets,
    /// are sent again elsewhere (a read that nothing was forwarded of), or end the session.
    fn release_requests(&mut self, i: usize, why: &str) -> Result<(), End> {
        let name = self.conns[i].backend.name.clone();
        let bit = 1u64 << i;
        let alive = self.alive_mask();
        let mut retry = None;
        for (k, req) in self.pending.iter_mut().enumerate() {
            if req.remaining & bit == 0 {
                continue;
            }
            req.remaining &= !bit;
            if k == 0 && req.primary == Some(i) && !req.primary_done {
                // Promote a backend still answering: it resumes at the same message.
                req.primary = bits(req.remaining & alive).next();
                if req.primary.is_none() {
                    if req.forwarded == 0 && req.retry.is_some() {
                        retry = Some(k);
                    } else {
                        return Err(
                            SessionError::NoBackend(format!("lost backend {name} in the middle of a reply: {why}")).into()
                        );
                    }
                }
            } else if req.remaining & alive == 0 && !req.primary_done {
                if req.retry.is_some() && req.forwarded == 0 {
                    retry = Some(k);
                } else {
                    return Err(SessionError::NoBackend(format!("lost backend {name} while it served a request: {why}")).into());
                }
            }
        }
        if alive == 0 {
            return Err(SessionError::NoBackend(format!("lost the last backend ({name}): {why}")).into());
        }
        if let Some(k) = retry {
            self.retry_elsewhere(k)?;
        }
        if self.pending.front().is_some_and(|r| r.remaining == 0) {
            self.complete_head()?;
        }
        // Frames other backends held back may be free to go now.
        self.on_backend_data()
    }

    /// A connection of this session ended on the backend's side (a FATAL, or the socket
    /// closed). What that means is decided here (contract, "What ejects a backend"):
    /// - every connection of the session ended with the same FATAL: the request's or the
    ///   session's own outcome (an idle timeout, `pg_terminate_backend(pg_backend_pid())`); the
    ///   client gets that FATAL and no backend leaves;
    /// - it ended in the middle of a request that may have committed elsewhere: when the others
    ///   finish that request, this backend differs from them and leaves as `down`;
    /// - otherwise a health check of the server decides: a failed server leaves as `down` and
    ///   the session goes on without it; a healthy one stays, and only this session ends (its
    ///   open transaction, if any, rolls back everywhere as its connections close).
    fn lost_conn(&mut self, i: usize, why: String, fatal: Option<BytesMut>) -> Result<(), End> {
        if !self.conns[i].alive {
            return Ok(());
        }
        // A closed socket whose FATAL was read but not yet reached (its frames wait behind an
        // earlier request) ended with that FATAL.
        let fatal = fatal.or_else(|| {
            let rbuf = &mut self.conns[i].rbuf;
            message::find_fatal(rbuf).map(|(at, len)| {
                let _ = rbuf.split_to(at);
                rbuf.split_to(len)
            })
        });
        let code = fatal.as_ref().map(|f| message::error_code(&f[5..]));
        // The session's own idle limits (idle_session_timeout, idle_in_transaction_session_
        // timeout) end it as they would on PostgreSQL, whatever the other backends do.
        if let (Some(frame), Some(b"57P05" | b"25P03")) = (&fatal, code.as_ref()) {
            if self.conns[i].queue.is_empty() {
                let frame = frame.clone();
                self.close_conn(i);
                return Err(End::Fatal(frame));
            }
        }
        // The first request queued there that may have committed: not a read the lead ran
        // alone (it changed nothing, and runs again on another backend), not a request inside
        // the client's transaction that does not end it (the transaction fails with 40001 once
        // the health check answers); but a COMMIT pipelined behind such a request is one.
        let at_risk = self.conns[i]
            .queue
            .iter()
            .copied()
            .find(|&seq| self.locks.holds_any() && !self.pending.iter().any(|r| r.seq == seq && (r.lead_read || r.in_block)));
        tracing::debug!(backend = %self.conns[i].backend.name, reason = %why, "a backend connection of the session ended");
        // Ended by an administrator's command (57P01) in the middle of nothing that may have
        // committed: perhaps a client's pg_terminate_backend through Chorus, which ends this
        // session, not just the request. Its requests wait for the health check to decide.
        let hold = code == Some(*b"57P01") && at_risk.is_none();
        self.conns[i].ended = Some(fanout::Ended { code, frame: fatal, at_risk, why: why.clone(), held: false });
        if !self.conns.iter().enumerate().any(|(j, c)| j != i && c.alive) {
            if let Some(frame) = self.alike_end() {
                self.close_conn(i);
                return Err(End::Fatal(frame));
            }
            // Each connection ended its own way: the servers are checked without the session.
            for j in 0..self.conns.len() {
                if self.conns[j].ended.take().is_some() {
                    let (cfg, cluster, b) = (self.shared.cfg.clone(), self.shared.cluster.clone(), self.conns[j].backend.clone());
                    tokio::spawn(async move {
                        if let Err(e) = crate::cluster::check(&cfg, &b).await {
                            cluster.eject(b.idx, BackendState::Down, &format!("connection lost and health check failed: {e}"));
                        }
                    });
                }
            }
        } else if at_risk.is_none() {
            let (cfg, b) = (self.shared.cfg.clone(), self.conns[i].backend.clone());
            let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = healthy.clone();
            let fut: Wakeup = Box::pin(async move {
                flag.store(crate::cluster::check(&cfg, &b).await.is_ok(), Ordering::Release);
            });
            self.checks.push((i, fut, healthy));
            if hold {
                if let Some(e) = self.conns[i].ended.as_mut() {
                    e.held = true;
                }
                tracing::debug!(backend = %self.conns[i].backend.name, reason = %why, "session lost a backend connection");
                self.close_conn(i);
                return Ok(());
            }
        }
        self.fail_conn(i, &why, false)
    }

    /// When every connection that ended undecided ended with the same FATAL: the lead's.
    fn alike_end(&mut self) -> Option<BytesMut> {
        let mut code = None;
        for c in self.conns.iter().filter_map(|c| c.ended.as_ref()) {
            match (code, c.code) {
                (_, None) => return None,
                (None, Some(x)) => code = Some(x),
                (Some(a), Some(b)) if a != b => return None,
                _ => {}
            }
        }
        code?;
        let frame = self.conns.iter_mut().find_map(|c| c.ended.as_mut().and_then(|e| e.frame.take()));
        for c in &mut self.conns {
            c.ended = None;
        }
        self.checks.clear();
        frame
    }

    /// The health check of a backend whose connection ended has answered.
    fn checked(&mut self, i: usize, healthy: bool) -> Result<(), End> {
        let Some(ended) = self.conns[i].ended.take() else {
            return Ok(());
        };
        if healthy && ended.code == Some(*b"57P01") && self.conns[i].backend.signals.requested() {
            // A client's pg_terminate_backend through Chorus ended this session's lead
            // connection: the session ends as on a single server; nothing is ejected.
            tracing::info!(backend = %self.conns[i].backend.name, "this session was terminated by pid through Chorus: it ends");
            metrics::counter!("chorus_sessions_terminated_by_pid_total").increment(1);
            return Err(match ended.frame {
                Some(f) => End::Fatal(f),
                None => SessionError::ConnectionLost(self.conns[i].backend.name.clone(), ended.why).into(),
            });
        }
        if ended.held {
            self.release_requests(i, &ended.why)?;
        }
        if healthy {
            let in_tx = self.router.tx_open || self.last_status != b'I';
            let idle = self.pending.is_empty() && !in_tx;
            let movable = self.settings.unmovable.is_none() && ended.at_risk.is_none() && self.checks.is_empty();
            if movable && !in_tx {
                // Nothing of a transaction was under way there: connect again (at the next
                // idle point) and rebuild the session's settings and prepared statements, as
                // for a backend that joins. Nothing new is routed until then.
                tracing::info!(backend = %self.conns[i].backend.name, reason = %ended.why, "a connection of this session ended while its server is healthy: reconnecting");
                self.reconnect_due = true;
                return self.on_client_data();
            }
            if movable {
                // Inside a transaction: it is aborted where it goes on, the client hears 40001
                // at its next statement, and the connection is made again once it has ended.
                let name = self.conns[i].backend.name.clone();
                tracing::info!(backend = %name, reason = %ended.why, "a connection of this session ended inside a transaction while its server is healthy: the transaction is aborted");
                self.abort_transaction(&format!("this session's connection to backend {name} ended"));
                self.router.fail_transaction(format!(
                    "could not serialize access: this session's connection to backend {name} ended ({}); the transaction was rolled back, retry it",
                    ended.why
                ));
                self.reconnect_due = true;
                self.on_client_data()?;
                return Ok(());
            }
            let why = match self.settings.unmovable {
                Some(what) if idle => format!("{}; the session holds {what}, which cannot be rebuilt there", ended.why),
                _ if idle => ended.why,
                _ => format!("{} inside a transaction", ended.why),
            };
            tracing::info!(backend = %self.conns[i].backend.name, reason = %why, "a connection of this session ended while its server is healthy: the session ends");
            return Err(match ended.frame {
                Some(f) => End::Fatal(f),
                None => SessionError::ConnectionLost(self.conns[i].backend.name.clone(), why).into(),
            });
        }
        let why = format!("{}; its health check failed", ended.why);
        self.shared.cluster.eject(self.conns[i].backend.idx, BackendState::Down, &why);
        if self.checks.is_empty() {
            // Routing waited for the check: what the client sent meanwhile goes now.
            self.on_client_data()?;
        }
        Ok(())
    }

    /// Aborts the open transaction on every live connection with Chorus's own request (its
    /// replies are compared, never forwarded).
    fn abort_transaction(&mut self, why: &str) {
        self.abort_on(self.alive_mask(), "40001", why);
    }

    /// Chorus's own failing statement (`code`, `why`) on `targets`: their open transaction
    /// is aborted.
    fn abort_on(&mut self, targets: u64, code: &str, why: &str) {
        let stmt = crate::sql::rewrite::error_statement(code, why);
        let mut q = BytesMut::new();
        message::query_msg(&mut q, &stmt);
        let bytes = q.freeze();
        let seq = self.send_own(targets, &bytes);
        self.pending.push_back(Request::internal(seq, targets, bytes));
    }

    /// The lead alone ran a read inside a transaction and its transaction is now aborted (the
    /// read failed, or the transaction had failed before): the others' transactions are
    /// aborted too, before anything else reaches them (routing waited for this outcome), so
    /// that what the client sends next (COMMIT, ROLLBACK, ROLLBACK TO SAVEPOINT, another
    /// statement) has the same outcome on every backend.
    fn follow_lead_abort(&mut self, req: &Request) {
        let targets = self.alive_mask() & !req.targets;
        if targets != 0 {
            self.abort_on(targets, "25P02", "the transaction failed on the lead backend of this session");
        }
    }

    /// The client's frames may drop the record's prepared statement: the next record
    /// prepares it again.
    fn note_record_statement_drop(&mut self, frames: &[u8]) {
        if self.record_prepared != 0 && crate::history::History::may_drop_record_statement(frames) {
            self.record_prepared = 0;
        }
    }

    /// Queues Chorus's own request to `targets`; returns its sequence number (the caller
    /// remembers the request in `pending`).
    fn send_own(&mut self, targets: u64, bytes: &Bytes) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        for i in bits(targets) {
            self.conns[i].queue.push_back(seq);
            self.conns[i].backend.inflight.fetch_add(1, Ordering::Relaxed);
            self.conns[i].out.push(bytes.clone());
        }
        seq
    }

    /// Request `req` is complete on the connections still alive: those that ended in the
    /// middle of it, where it may have committed, differ from the others and leave.
    fn settle_at_risk(&mut self, req: &Request) -> Result<(), End> {
        for i in bits(req.targets) {
            if self.conns[i].ended.as_ref().is_some_and(|e| e.at_risk == Some(req.seq)) {
                let ended = self.conns[i].ended.take().map(|e| e.why).unwrap_or_default();
                let why = format!("{ended} in the middle of a write that the other backends completed");
                self.shared.cluster.eject(self.conns[i].backend.idx, BackendState::Down, &why);
            }
        }
        Ok(())
    }

    /// Sends a read that lost its only backend before any reply to another backend.
    fn retry_elsewhere(&mut self, k: usize) -> Result<(), End> {
        if k + 1 != self.pending.len() {
            return Err(SessionError::NoBackend("lost the backend serving a pipelined read".into()).into());
        }
        let alive = self.alive_mask();
        let Some(j) = bits(alive).min_by_key(|&j| (self.conns[j].queue.len(), j)) else {
            return Err(SessionError::NoBackend("no backend left to retry a read on".into()).into());
        };
        if !self.conns[j].queue.is_empty() {
            return Err(SessionError::NoBackend("lost the backend serving a pipelined read".into()).into());
        }
        let req = &mut self.pending[k];
        let bytes = req.retry.clone().unwrap_or_default();
        req.targets |= 1 << j;
        req.remaining |= 1 << j;
        req.primary = None;
        let seq = req.seq;
        tracing::debug!(backend = %self.conns[j].backend.name, "retrying a read on another backend");
        self.conns[j].queue.push_back(seq);
        self.conns[j].backend.inflight.fetch_add(1, Ordering::Relaxed);
        self.conns[j].out.push(bytes);
        Ok(())
    }

    fn close_conn(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.alive {
            c.alive = false;
            c.stream.shutdown_now();
            c.backend.inflight.fetch_sub(c.queue.len() as u32, Ordering::Relaxed);
            c.rbuf = BytesMut::new();
            c.out = OutQueue::default();
        }
    }

    // ---- to the client ---------------------------------------------------------------------

    /// Queues a backend frame for the client; neighbouring frames join without a copy.
    #[inline]
    fn forward(&mut self, frame: BytesMut) {
        match &mut self.run {
            Some(run) => run.unsplit(frame),
            None => self.run = Some(frame),
        }
    }

    fn forward_static(&mut self, b: Bytes) {
        self.flush_run();
        self.bytes_out.increment(b.len() as u64);
        self.client_out.push(b);
    }

    fn flush_run(&mut self) {
        if let Some(run) = self.run.take() {
            self.bytes_out.increment(run.len() as u64);
            self.client_out.push(run.freeze());
        }
    }
}

impl Request {
    /// Chorus's own request to `targets`: compared, never forwarded to the client.
    fn internal(seq: u64, targets: u64, sql: Bytes) -> Request {
        Request {
            seq,
            targets,
            remaining: targets,
            primary: None,
            primary_done: true,
            forwarded: 0,
            rfq_sent: true,
            writes: false,
            hash_rows: false,
            per_server: false,
            lead_answers: false,
            signals: false,
            cancel_spread: false,
            own_error: false,
            inject: false,
            held: Vec::new(),
            again: None,
            expect: None,
            gave_up: 0,
            internal: true,
            wrapped: false,
            quiet: false,
            record: false,
            trims: VecDeque::new(),
            sql,
            retry: None,
            lead_read: false,
            in_block: false,
            first_done_at: None,
            sent_at: Instant::now(),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        for r in self.pending.iter().filter(|r| r.signals) {
            for i in bits(r.targets) {
                self.conns[i].backend.signals.ended();
            }
        }
        for c in &self.conns {
            if c.alive {
                c.backend.inflight.fetch_sub(c.queue.len() as u32, Ordering::Relaxed);
            }
        }
    }
}

/// Whether connection `i` may become the primary of `req`. Writes and session statements are
/// answered by the lead among their live targets: with two backends the lead wins every tie,
/// so the reply the client sees is the winner's, and once the client has its answer the lead
/// has done it (a LISTEN is in place on the server whose notifications the client gets).
/// Reads are answered by whoever is first.
fn may_lead(req: &Request, conns: &[BackendConn], i: usize) -> bool {
    let serves = |j: usize| conns[j].alive && conns[j].backend.serves_reads() && req.gave_up & (1u64 << j) == 0;
    serves(i) && (!(req.writes || req.lead_answers) || bits(req.targets).find(|&j| serves(j)) == Some(i))
}

/// The set bits of a mask, lowest first.
fn bits(mut m: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        if m == 0 {
            return None;
        }
        let i = m.trailing_zeros() as usize;
        m &= m - 1;
        Some(i)
    })
}

/// Errors that depend on timing on one server (a statement timeout, a lock wait that timed
/// out, a serialization failure, a deadlock): where some backends give one and others succeed,
/// no backend has failed.
const TIMING_SQLSTATES: [&[u8; 5]; 4] = [b"57014", b"55P03", b"40001", b"40P01"];

/// Whether a request's first frame is Chorus's own error statement (`rewrite::error_statement`).
fn is_own_error(frame: &Bytes) -> bool {
    let body = frame.get(5..).unwrap_or_default();
    let sql = match frame.first() {
        Some(&message::QUERY) => message::query_sql(body).ok(),
        Some(&message::PARSE) => message::parse_fields(body).ok().map(|(_, s)| s),
        _ => None,
    };
    sql.is_some_and(|s| s.starts_with(crate::sql::rewrite::ERROR_STATEMENT_PREFIX.as_bytes()))
}

/// A login refused for lack of resources (SQLSTATE class 53) or because the server is starting
/// or shutting down (57P03).
fn is_resource_refusal(body: &[u8]) -> bool {
    let code = message::error_code(body);
    code.starts_with(b"53") || &code == b"57P03"
}

/// What became of a primary's frame in `Session::take_primary_frame`.
enum Flow {
    /// Consumed; read the next frame.
    Next,
    /// Nothing to do now.
    Stop,
    /// The request's ReadyForQuery: the connection's part of it is over.
    ReadyForQuery,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_lists_set_bits() {
        assert_eq!(bits(0b1011).collect::<Vec<_>>(), vec![0, 1, 3]);
        assert_eq!(bits(0).count(), 0);
    }
}
