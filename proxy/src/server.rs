//! The listener: startup checks, accepting clients, the connection limit, clean shutdown.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{self, BackendState, Cluster, ClusterError};
use crate::config::Config;
use crate::protocol::message::{self, Severity};
use crate::session;
use crate::shared::Shared;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("no reachable in-sync backend ({0})")]
    NoBackend(String),
    #[error("update history: {0}")]
    History(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Ha(#[from] crate::ha::HaError),
    #[error("the new leader's fence: {0}")]
    Fence(#[from] crate::ha::fence::FenceError),
    #[error("etcd: {0}")]
    SharedStates(String),
    #[error(transparent)]
    OtherWriter(cluster::writer::WriterError),
}

pub struct Server {
    shared: Arc<Shared>,
    /// None for a standby until it wins the leadership.
    listener: Option<TcpListener>,
    admin: Option<TcpListener>,
    admin_tls: Option<Arc<crate::tls::ServerTls>>,
}

impl Server {
    /// Opens the cluster state, binds the listener and checks that a backend answers.
    pub async fn start(cfg: Config) -> Result<Server, StartError> {
        let cfg = Arc::new(cfg);
        // The files first: a bad certificate stops Chorus before it touches a backend.
        let tls = crate::tls::ServerTls::from_config(&cfg.tls)?.map(Arc::new);
        let admin_tls = crate::tls::ServerTls::admin(&cfg.tls)?.map(Arc::new);
        for b in &cfg.backends {
            crate::tls::backend::client_config(&cfg.backend_tls(&b.host, b.port))?;
        }
        crate::tls::backend::client_config(&cfg.backend_tls("", 0))?;
        // Before anything records a metric: handles taken earlier would go nowhere.
        crate::admin::metrics_handle();
        let cluster = Arc::new(Cluster::open(&cfg)?);
        let in_sync = cluster.in_sync();
        if in_sync.is_empty() {
            let states: Vec<String> = cluster.backends().iter().map(|b| format!("{} is {}", b.name, b.state())).collect();
            return Err(StartError::NoBackend(states.join(", ")));
        }
        let probes = futures::future::join_all(in_sync.iter().map(|b| cluster::probe(&cfg, b, cfg.connect_timeout))).await;
        let mut failures = Vec::new();
        for (b, r) in in_sync.iter().zip(probes) {
            if let Err(e) = r {
                failures.push(format!("{} at {}: {e}", b.name, b.addr));
                if in_sync.len() > 1 {
                    cluster.eject(b.idx, BackendState::Down, &format!("unreachable when Chorus started: {e}"));
                }
            }
        }
        if failures.len() == in_sync.len() {
            return Err(StartError::NoBackend(failures.join("; ")));
        }
        warn_about_connection_limits(&cfg, &cluster).await;
        if cfg.history && cfg.ha.is_none() {
            hold_histories(&cfg, &cluster, false).await?;
        }
        let history = if cfg.history && cfg.ha.is_some() {
            // A member of a group recovers when it wins the leadership, not before.
            Some(Arc::new(crate::history::History::open(&cfg).map_err(|e| StartError::History(e.to_string()))?))
        } else if cfg.history {
            let h = Arc::new(crate::history::History::open(&cfg).map_err(|e| StartError::History(e.to_string()))?);
            // Before any client: the backends hold every unit that committed anywhere.
            let done = crate::history::recover::recover(&cfg, &cluster, &h).await.map_err(StartError::History)?;
            tracing::info!(units = done.units, serial = done.newest, "update history read; recovery done");
            if cluster.in_sync().is_empty() {
                return Err(StartError::NoBackend("recovery left no in-sync backend".into()));
            }
            Some(h)
        } else {
            tracing::info!("history = false: a crash of Chorus mid-commit is not repaired (docs/operations.md)");
            None
        };
        // Listen only once the backends are checked: a client that can connect is served. A
        // member of a group listens only while it leads.
        let listener = match cfg.ha {
            Some(_) => None,
            None => Some(bind(&cfg.listen).await?),
        };
        let admin = if cfg.admin_token.is_empty() {
            tracing::warn!("admin API off: set admin_token (or CHORUS_ADMIN_TOKEN) to enable it and /metrics");
            None
        } else {
            Some(
                TcpListener::bind(&cfg.admin_listen)
                    .await
                    .map_err(|source| StartError::Listen { addr: cfg.admin_listen.clone(), source })?,
            )
        };
        let ha = match &cfg.ha {
            Some(ha) => {
                let address = ha.address(&cfg.listen);
                Some(crate::ha::Member::start(ha, address, cfg.admin_listen.clone()).await?)
            }
            None => None,
        };
        let mut ha_states = None;
        if let (Some(m), Some(hc)) = (&ha, &cfg.ha) {
            let mirror = crate::ha::states::EtcdStates::start(hc, m.clone())
                .map_err(|e| StartError::SharedStates(format!("cannot start the state writer: {e}")))?;
            cluster.share_states(Box::new(mirror.clone()));
            ha_states = Some(mirror);
        }
        let mut shared = Shared::new(cfg, cluster, history);
        shared.tls = tls;
        shared.ha = ha;
        shared.ha_states = ha_states;
        let shared = Arc::new(shared);
        if let Some(addr) = admin.as_ref().and_then(|l| l.local_addr().ok()) {
            if admin_tls.is_none() && !addr.ip().is_loopback() {
                tracing::warn!(
                    listen = %addr,
                    "the admin API listens beyond loopback without TLS: its token and answers cross the network in the clear; \
                     set [tls] admin_https = true"
                );
            }
        }
        Ok(Server { shared, listener, admin, admin_tls })
    }

    /// Where clients connect (None: a standby, whose port is closed).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Serves clients until `shutdown` completes, then stops accepting, lets open
    /// transactions finish for up to `shutdown_timeout`, and returns. A member of a group
    /// stands by until it leads, and returns `Deposed` when it stops leading (the caller
    /// starts it again as a standby).
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Ended {
        let Server { shared, listener, admin, admin_tls } = self;
        if let Some(l) = admin {
            tracing::info!(listen = %shared.cfg.admin_listen, https = admin_tls.is_some(), "admin API ready");
            tokio::spawn(crate::admin::serve(shared.clone(), l, admin_tls.clone()));
        }
        let tracker = TaskTracker::new();
        let workers = match Workers::start(shared.cfg.threads()) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot start session threads");
                return Ended::Shutdown;
            }
        };
        cluster::spawn_health_checks(shared.cfg.clone(), shared.cluster.clone(), shared.stop.clone());
        let probe = shared.clone();
        crate::watchdog::marks().accepted();
        crate::watchdog::spawn(Box::new(move || probe.order.locks.probe()), shared.cfg.health_check_interval);
        let reloaded = shared.tls.iter().map(|t| ("clients", t.clone())).chain(admin_tls.map(|t| ("admin API", t))).collect();
        crate::tls::spawn_reload_on_sighup(reloaded, shared.stop.clone());
        tokio::pin!(shutdown);
        let listener = match listener {
            Some(l) => l,
            None => match take_over(&shared, &mut shutdown).await {
                Ok(Some(l)) => l,
                Ok(None) => {
                    if let Some(m) = &shared.ha {
                        m.resign().await;
                    }
                    shared.stop.cancel();
                    workers.stop();
                    return Ended::Shutdown;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the takeover failed: standing by again");
                    shared.depose(&e.to_string());
                    shared.stop.cancel();
                    workers.stop();
                    if let Some(m) = &shared.ha {
                        m.resign().await;
                    }
                    return Ended::Deposed;
                }
            },
        };
        if let Some(h) = &shared.history {
            crate::history::prune::spawn(shared.cfg.clone(), shared.cluster.clone(), h.clone(), shared.stop.clone());
            crate::join::catch_up::spawn_watch(shared.clone());
        }
        tracing::info!(listen = %shared.cfg.listen, backends = shared.cluster.in_sync_count(), "Chorus is ready");
        crate::watchdog::ready(&format!("serving on {}", shared.cfg.listen));
        let mut tick = tokio::time::interval(crate::watchdog::ACCEPT_TICK);
        let wedge_at = crate::watchdog::test_wedge_at();
        let lost = async {
            match &shared.ha {
                Some(m) => m.lost().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(lost);
        let draining = async {
            match &shared.ha {
                Some(m) => m.draining().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(draining);
        let mut ended = Ended::Shutdown;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = &mut lost => {
                    ended = Ended::Deposed;
                    break;
                }
                _ = &mut draining => {
                    ended = Ended::HandedOver;
                    break;
                }
                _ = tick.tick() => {
                    crate::watchdog::marks().accepted();
                    crate::watchdog::test_wedge(wedge_at);
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        crate::watchdog::marks().accepted();
                        workers.serve(&tracker, stream, peer, shared.clone());
                    }
                    Err(e) => {
                        // Out of descriptors, say: wait a moment rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        }
        if ended == Ended::Deposed {
            // Nothing of this leadership can commit any more: sessions end now, with 57P01.
            shared.deposed.cancel();
        }
        if ended == Ended::HandedOver {
            // Sessions end at their transaction boundaries, with 57P01.
            shared.handing_over.cancel();
        }
        // Sessions learn first (idle ones end with 57P03), then the listener closes. Clients
        // the kernel accepted that the loop did not yet take are answered 57P03 at their login
        // (libpq then tries the next host of a multi-host string), not reset by the close.
        shared.stop.cancel();
        while let Some(Ok((stream, peer))) = futures::FutureExt::now_or_never(listener.accept()) {
            workers.serve(&tracker, stream, peer, shared.clone());
        }
        drop(listener);
        tracing::info!(
            sessions = shared.clients.load(Ordering::Relaxed),
            "shutting down: no new clients; waiting for open transactions"
        );
        tracker.close();
        let wait = match (ended, &shared.cfg.ha) {
            (Ended::Deposed, _) => std::time::Duration::from_secs(1),
            (Ended::HandedOver, Some(ha)) => ha.switchover_timeout,
            _ => shared.cfg.shutdown_timeout,
        };
        if tokio::time::timeout(wait, tracker.wait()).await.is_err() {
            tracing::warn!(
                sessions = shared.clients.load(Ordering::Relaxed),
                "the wait for open transactions ran out; closing the remaining sessions"
            );
        }
        workers.stop();
        if let (Ended::HandedOver, Some(m)) = (ended, &shared.ha) {
            // Every session of this leadership is over: the key goes to the standby (or, if
            // that fails, with the lease below, to whichever standby wins it).
            let _ = m.hand_over().await;
        }
        // The lease goes with this leadership, stopped or deposed: the standby need not wait
        // for it to expire (when etcd answers; otherwise it expires on its own).
        if let Some(m) = &shared.ha {
            m.resign().await;
        }
        tracing::info!("Chorus stopped");
        ended
    }
}

/// How `Server::run` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Asked to stop.
    Shutdown,
    /// It led and no longer does: start again as a standby.
    Deposed,
    /// It handed the leadership over in a planned switchover: start again as a standby.
    HandedOver,
}

async fn bind(addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr: addr.to_string(), source })
}

/// A standby waits for the leadership, then fences the backends with its epoch, recovers from
/// the update history as at a start, and opens its client port. None: asked to stop first.
async fn take_over(
    shared: &Arc<Shared>,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> Result<Option<TcpListener>, StartError> {
    let (Some(member), Some(history)) = (&shared.ha, &shared.history) else {
        return Err(StartError::History("[ha] needs the update history".into()));
    };
    tracing::info!("standing by: the client port stays closed while another member leads");
    crate::watchdog::ready("standing by");
    let mut tick = tokio::time::interval(crate::watchdog::ACCEPT_TICK);
    let leading = member.leading();
    tokio::pin!(leading);
    // Open, not accepting, while a planned switchover names this member: clients that come
    // meanwhile wait in the backlog and are served once it leads.
    let mut parked: Option<TcpListener> = None;
    let epoch = loop {
        tokio::select! {
            biased;
            e = &mut leading => break e,
            _ = shutdown.as_mut() => return Ok(None),
            _ = member.lost() => return Err(crate::ha::HaError::TaskEnded.into()),
            park = member.parking_changed(parked.is_some()) => {
                parked = park_port(member, &shared.cfg.listen, park).await;
            }
            // Standing by is this loop's work: the watchdog sees it go round.
            _ = tick.tick() => crate::watchdog::marks().accepted(),
        }
    };
    crate::watchdog::status("taking over: fencing the backends and recovering");
    let started = std::time::Instant::now();
    let cfg = &shared.cfg;
    // The states the last leader wrote come first: the fence and the recovery work on the
    // backends it kept in sync, not on this member's own older view.
    let known = shared.cluster.backends().len();
    let mut tries = 0;
    let last = loop {
        match crate::ha::states::load(member).await {
            Ok(l) => break l,
            // One etcd endpoint of several may be down: another answers the next try.
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::debug!(error = %e, "etcd: reading the shared backend states; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(StartError::SharedStates(format!("reading the shared backend states: {e}"))),
        }
    };
    shared.cluster.adopt(&last.unwrap_or_default(), cfg)?;
    // The last leader's join, as far as it came (shown by GET /join and the dashboard).
    match crate::ha::states::load_join(member).await {
        Ok(Some(p)) => shared.joins.adopt(p),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "etcd: the last leader's join progress could not be read"),
    }
    for b in shared.cluster.backends().iter().skip(known) {
        cluster::spawn_health_check(shared.cfg.clone(), shared.cluster.clone(), b.clone(), shared.stop.clone());
    }
    crate::ha::fence::raise(cfg, &shared.cluster, history.key(), epoch).await?;
    hold_histories(cfg, &shared.cluster, true).await?;
    history.set_epoch(epoch);
    let done = crate::history::recover::recover(cfg, &shared.cluster, history).await.map_err(StartError::History)?;
    if shared.cluster.in_sync().is_empty() {
        return Err(StartError::NoBackend("the takeover left no in-sync backend".into()));
    }
    if let Some(l) = parked {
        let _ = member.announce_ready(false).await;
        tracing::info!(epoch, took_ms = started.elapsed().as_millis() as u64, "leading after a planned switchover: accepting");
        return Ok(Some(l));
    }
    // The port the last leader had on this host may take a moment to be free.
    let mut tries = 0;
    let listener = loop {
        match bind(&cfg.listen).await {
            Ok(l) => break l,
            Err(e) if tries < 20 => {
                tries += 1;
                tracing::debug!(error = %e, "client port busy; trying again");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    };
    tracing::info!(
        epoch,
        units = done.units,
        serial = done.newest,
        took_ms = started.elapsed().as_millis() as u64,
        "leading: backends fenced, history recovered, client port open"
    );
    Ok(Some(listener))
}

/// Opens (or closes) the client port of a standby a planned switchover names, and tells the
/// leader. The listener, when open.
async fn park_port(member: &crate::ha::Member, listen: &str, open: bool) -> Option<TcpListener> {
    if !open {
        tracing::info!("the planned switchover to this member was called off: client port closed");
        let _ = member.announce_ready(false).await;
        return None;
    }
    match bind(listen).await {
        Ok(l) => match member.announce_ready(true).await {
            Ok(()) => {
                tracing::info!(listen, "a planned switchover names this member: client port open, accepting once it leads");
                Some(l)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot tell etcd the client port is open: keeping it closed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "a planned switchover names this member, but its client port cannot be opened");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            None
        }
    }
}

/// Takes the update history's writer lock on every in-sync backend (`cluster::writer`): one
/// held by another instance stops the start; one that cannot be reached leaves the in-sync
/// set. A new leader (`evict`) ends the last writer's session first.
async fn hold_histories(cfg: &Config, cluster: &Cluster, evict: bool) -> Result<(), StartError> {
    for (idx, e) in cluster::writer::take_all(cfg, &cluster.in_sync(), evict).await {
        match e {
            cluster::writer::WriterError::Held { .. } if !evict => return Err(StartError::OtherWriter(e)),
            e => {
                cluster.eject(idx, BackendState::Down, &format!("cannot hold its update history: {e}"));
            }
        }
    }
    cluster.become_history_writer();
    Ok(())
}

/// Every client session holds one connection per backend: a warning when the backends'
/// `max_connections` (less the slots reserved for superusers) cannot take
/// `max_client_connections` sessions plus Chorus's own connections.
async fn warn_about_connection_limits(cfg: &Config, cluster: &Cluster) {
    for b in cluster.in_sync() {
        let login = cluster::Login::health(cfg, &b.host, b.port, &cfg.health_check_database, "chorus-startup");
        let Ok(client) = login.connect().await else { continue };
        let q = "SELECT current_setting('max_connections')::int - current_setting('superuser_reserved_connections')::int";
        if let Ok(row) = client.query_one(q, &[]).await {
            let room: i32 = row.get(0);
            if (room.max(0) as usize) < cfg.max_client_connections + 4 {
                tracing::warn!(
                    backend = %b.name,
                    backend_slots = room,
                    max_client_connections = cfg.max_client_connections,
                    "max_client_connections exceeds what this backend's max_connections can take: \
                     clients past it get the backend's 53300 at login"
                );
            }
        }
    }
}

/// Session threads, each running a single-threaded runtime. Sessions are dealt round-robin.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    fn start(n: usize) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 0..n.max(1) {
            // Sockets and timers only: sessions start no processes and catch no signals, and the
            // process driver would otherwise look for orphans at every turn of the loop.
            let rt = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
            handles.push(rt.handle().clone());
            let stop = stop.clone();
            threads.push(std::thread::Builder::new().name(format!("chorus-sessions-{i}")).spawn(move || {
                rt.block_on(stop.cancelled());
                // Dropping the runtime ends whatever sessions outlived the shutdown timeout.
            })?);
        }
        Ok(Workers { handles, threads, stop, next: AtomicUsize::new(0) })
    }

    fn next(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }

    /// Runs an accepted client's session on the next worker thread: its sockets' wake-ups
    /// never cross threads.
    fn serve(&self, tracker: &TaskTracker, stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
        let Ok(std) = stream.into_std() else { return };
        self.next().spawn(tracker.track_future(async move {
            match TcpStream::from_std(std) {
                Ok(stream) => client(stream, peer, shared).await,
                Err(e) => tracing::warn!(error = %e, "cannot register a client socket"),
            }
        }));
    }

    fn stop(self) {
        self.stop.cancel();
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Counts the client for `max_client_connections` while it lives.
async fn client(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let n = shared.clients.fetch_add(1, Ordering::AcqRel) + 1;
    struct Count<'a>(&'a AtomicUsize);
    impl Drop for Count<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _count = Count(&shared.clients);
    if n > shared.cfg.max_client_connections {
        tracing::warn!(%peer, limit = shared.cfg.max_client_connections, "too many clients");
        metrics::counter!("chorus_clients_refused_total").increment(1);
        let mut buf = BytesMut::new();
        message::error_response(&mut buf, Severity::Fatal, "53300", "sorry, too many clients already");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), stream.write_all(&buf)).await;
        return;
    }
    session::serve(stream, shared.clone()).await;
}
