//! The dashboard at the admin API's `/`, opened in headless Chromium against a live cluster:
//! the login box, every backend with its state, a killed backend turning `down` within the
//! refresh interval, a join's phases, verify and remove from the page. A screenshot of each
//! step is kept in `target/artefacts/dashboard/`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chorus_testkit::browser::Browser;
use chorus_testkit::ADMIN_TOKEN;
use common::{ChorusOptions, PgOptions, PgServer, Setup};

/// The page's refresh interval (REFRESH_MS in dashboard.js).
const REFRESH: Duration = Duration::from_secs(2);

fn artefacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/artefacts/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(b: &mut Browser, name: &str) {
    b.screenshot(&artefacts().join(format!("{name}.png"))).await.unwrap();
}

/// The state the page shows for `backend`, once the page shows it.
fn state_of(backend: &str) -> String {
    format!("document.querySelector('tr[data-backend=\"{backend}\"] [data-state]')?.dataset.state")
}

/// The status code of a GET of `url` with the admin token or none, over plain TCP.
async fn http_status(url: &str, token: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let req = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_cluster_and_drives_it() {
    let opts = ChorusOptions { extra: "health_check_failures = 1\n".into(), ..Default::default() };
    let mut s = Setup::with(3, opts).await;
    let admin = s.chorus.admin_url();
    let c = s.client().await;
    c.batch_execute(
        "CREATE TABLE big (id int PRIMARY KEY, pad text); \
         INSERT INTO big SELECT g, repeat('x', 300) FROM generate_series(1, 200000) g",
    )
    .await
    .unwrap();
    // A little traffic for the charts.
    let load = {
        let c = s.client().await;
        tokio::spawn(async move {
            for i in 0.. {
                if c.execute("UPDATE big SET pad = $1 WHERE id = $2", &[&format!("y{i}"), &(i % 1000 + 1)]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Without the token: the page asks for it and the API answers 401.
    let mut b = Browser::start().await.unwrap();
    b.open(&format!("{admin}/")).await.unwrap();
    let login_shown = b.eval("!document.getElementById('login').hidden && document.getElementById('main').hidden").await.unwrap();
    assert_eq!(login_shown, serde_json::json!(true), "the login box is shown without a token");
    let status = b.eval("fetch('/status').then(r => r.status)").await.unwrap();
    assert_eq!(status, serde_json::json!(401));
    assert_eq!(http_status(&format!("{admin}/backends"), None).await, 401);
    assert_eq!(http_status(&format!("{admin}/backends"), Some(ADMIN_TOKEN)).await, 200);
    // The page itself needs no token: it holds nothing.
    assert_eq!(http_status(&format!("{admin}/"), None).await, 200);
    // A wrong token is refused in place.
    b.fill("#token", "not-the-token").await.unwrap();
    b.click("#login-form button").await.unwrap();
    let refused = b.wait("document.getElementById('login-error').textContent", Duration::from_secs(5)).await.unwrap();
    assert_eq!(refused, serde_json::json!("The token was refused."));
    shot(&mut b, "01-login").await;

    // With the token: every backend and its state; the token is in session storage, not in
    // the URL.
    b.fill("#token", ADMIN_TOKEN).await.unwrap();
    b.click("#login-form button").await.unwrap();
    let rows = b
        .wait(
            "document.querySelectorAll('tr[data-backend]').length === 3 && document.querySelectorAll('tr[data-backend]').length",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert_eq!(rows, serde_json::json!(3));
    for name in ["pg1", "pg2", "pg3"] {
        assert_eq!(b.eval(&state_of(name)).await.unwrap(), serde_json::json!("in_sync"), "{name}");
    }
    let href = b.eval("location.href").await.unwrap();
    assert!(!href.as_str().unwrap().contains(ADMIN_TOKEN), "{href}");
    assert_eq!(b.eval("sessionStorage.getItem('chorus-admin-token')").await.unwrap(), serde_json::json!(ADMIN_TOKEN));
    let version = b.eval("document.querySelector('tr[data-backend=\"pg1\"] td:nth-child(4)').textContent").await.unwrap();
    assert!(version.as_str().unwrap().starts_with(s.servers[0].version().split('.').next().unwrap()), "{version}");
    // The charts have samples once the series has a few seconds.
    b.wait("Number(document.body.dataset.samples || 0) >= 3", Duration::from_secs(15)).await.unwrap();
    shot(&mut b, "02-backends").await;

    // A backend killed shows as down within one refresh of Chorus noticing it.
    s.servers[1].kill();
    s.wait_state("pg2", "down").await;
    let noticed = Instant::now();
    b.wait(&format!("{} === 'down'", state_of("pg2")), REFRESH + Duration::from_secs(1)).await.unwrap();
    assert!(noticed.elapsed() <= REFRESH + Duration::from_secs(1));
    let in_sync = b.eval("document.getElementById('in-sync').textContent").await.unwrap();
    assert_eq!(in_sync, serde_json::json!("2 of 3"));
    shot(&mut b, "03-backend-down").await;

    // Remove, with the confirmation dismissed (nothing happens) and then accepted.
    b.dialogs(false).await.unwrap();
    b.click("button[data-remove=\"pg2\"]").await.unwrap();
    let asked = b.dialogs(true).await.unwrap();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(asked[0].starts_with("Remove backend pg2"), "{asked:?}");
    assert_eq!(s.chorus.states()["pg2"], "down", "a dismissed confirmation removes nothing");
    b.click("button[data-remove=\"pg2\"]").await.unwrap();
    let done = b.wait("document.getElementById('action-result').textContent", Duration::from_secs(10)).await.unwrap();
    assert_eq!(done, serde_json::json!("pg2 was removed."));
    b.wait(&format!("{} === 'removed'", state_of("pg2")), REFRESH * 2).await.unwrap();
    assert_eq!(s.chorus.states()["pg2"], "removed");
    shot(&mut b, "04-removed").await;

    // A join started from chorusctl: the page shows its phases while it runs and the new
    // backend in sync at the end. A write transaction held open keeps the join in its detach
    // step (it waits for the writes in flight), so the page is seen mid-join for certain.
    let holder = s.client().await;
    holder.batch_execute("BEGIN; UPDATE big SET pad = 'held' WHERE id = 5000").await.unwrap();
    let newcomer = PgServer::start(PgOptions::default()).await.unwrap();
    let port = newcomer.port().to_string();
    let ctl = {
        let chorus_ctl = s.chorus.chorusctl_command(&["join", "pg4", "--host", "127.0.0.1", "--port", &port]);
        tokio::task::spawn_blocking(move || {
            let mut cmd = chorus_ctl;
            common::sh(&mut cmd)
        })
    };
    let running = b
        .wait("document.querySelector('#join:not([hidden]) li.current')?.dataset.phase === 'detaching'", Duration::from_secs(20))
        .await;
    assert!(running.is_ok(), "{running:?}");
    let done_before = b.eval("document.querySelectorAll('#join-phases li.done').length").await.unwrap();
    assert_eq!(done_before, serde_json::json!(1), "starting is done, detaching under way");
    shot(&mut b, "05-join-running").await;
    holder.batch_execute("COMMIT").await.unwrap();
    let (ok, out) = ctl.await.unwrap();
    assert!(ok, "join failed: {out}\n{}", s.chorus.log());
    b.wait("document.querySelector('[data-fact=\"phase\"]')?.textContent === 'done'", REFRESH * 2).await.unwrap();
    b.wait(&format!("{} === 'in_sync'", state_of("pg4")), REFRESH * 2).await.unwrap();
    let phases_done = b.eval("document.querySelectorAll('#join-phases li.done').length").await.unwrap();
    assert_eq!(phases_done, serde_json::json!(7), "every phase shows as done");
    // The bar is full once its width's transition has run.
    let full = "(() => { const b = document.getElementById('join-bar'); \
                return b.getBoundingClientRect().width >= b.parentElement.getBoundingClientRect().width - 0.5; })()";
    b.wait(full, REFRESH * 2).await.unwrap();
    shot(&mut b, "06-join-done").await;

    // Verify from the page: the result in place.
    load.abort();
    b.click("#verify").await.unwrap();
    let verdict = b
        .wait(
            "(t => t.startsWith('Verifying') ? null : t)(document.getElementById('verify-result').textContent)",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(verdict.as_str().unwrap().starts_with("Every table is equal on every in-sync backend"), "{verdict}");
    shot(&mut b, "07-verified").await;
    let failed = b.failed_responses().await.unwrap();
    // The only refusals were the calls made without the token or with the wrong one.
    assert!(failed.iter().all(|f| f.starts_with("401 /status")), "{failed:?}");
    drop(newcomer);
}

/// Waits until `m`'s admin API says it has `role`.
async fn wait_role(m: &common::ChorusProcess, role: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.role().await.as_deref() != Some(role) {
        assert!(Instant::now() < deadline, "never {role}: {}", m.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `[ha]`: the leader's page shows both members with their roles and the epoch, and its
/// button hands the leadership to the standby, which then leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_members_and_switches_over() {
    let etcd = chorus_testkit::etcd::Etcd::start(1).await.unwrap();
    let servers = [PgServer::start(PgOptions::default()).await.unwrap(), PgServer::start(PgOptions::default()).await.unwrap()];
    let refs: Vec<&PgServer> = servers.iter().collect();
    let ha = |node: &str| format!("{}\ncluster = \"d\"\nnode_name = \"{node}\"\nlease_ttl = \"3s\"", etcd.endpoints_toml(&[0]));
    let bin = common::chorus_bin();
    let a = common::ChorusProcess::start_member(bin, &refs, ChorusOptions::default(), &ha("a")).await.unwrap();
    wait_role(&a, "leader").await;
    let b = common::ChorusProcess::start_member(bin, &refs, ChorusOptions::default(), &ha("b")).await.unwrap();
    wait_role(&b, "standby").await;

    let mut page = Browser::start().await.unwrap();
    page.open(&format!("{}/", a.admin_url())).await.unwrap();
    page.fill("#token", ADMIN_TOKEN).await.unwrap();
    page.click("#login-form button").await.unwrap();
    page.wait("document.querySelectorAll('tr[data-member]').length === 2", Duration::from_secs(10)).await.unwrap();
    let role = |m: &str| format!("document.querySelector('tr[data-member=\"{m}\"] [data-role]').dataset.role");
    assert_eq!(page.eval(&role("a")).await.unwrap(), serde_json::json!("leader"));
    assert_eq!(page.eval(&role("b")).await.unwrap(), serde_json::json!("standby"));
    let title = page.eval("document.getElementById('members-title').textContent").await.unwrap();
    assert!(title.as_str().unwrap().starts_with("epoch ") && title.as_str().unwrap().contains("from a (leader)"), "{title}");
    // Only the standby has a button: the leader hands over, it does not take over.
    let buttons = page.eval("[...document.querySelectorAll('[data-switchover]')].map(b => b.dataset.switchover)").await.unwrap();
    assert_eq!(buttons, serde_json::json!(["b"]));
    shot(&mut page, "08-members").await;

    page.dialogs(true).await.unwrap();
    page.click("button[data-switchover=\"b\"]").await.unwrap();
    let said = page
        .wait("document.getElementById('members-result').textContent.startsWith('Switching over to b') && document.getElementById('members-result').textContent", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(said.as_str().unwrap().contains("open transactions get 5 s"), "{said}");
    shot(&mut page, "09-switchover").await;
    wait_role(&b, "leader").await;
    wait_role(&a, "standby").await;
    assert!(b.serves().await && !a.serves().await, "b serves, a stands by with its port closed");
    let dialogs = page.dialogs(true).await.unwrap();
    assert!(dialogs.iter().any(|d| d.starts_with("Hand the leadership to b?")), "{dialogs:?}");
}
