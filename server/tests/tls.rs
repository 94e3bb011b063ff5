//! TLS between all parties, with the real `mig-server` binary on loopback: a controller and
//! node agents serving https with certificates of a CA made for the test (none is stored in
//! the repository), clients that trust that CA and clients that do not, registration, the
//! CLI, and a checkpoint streamed from one agent to another. No containerd is needed: the
//! controller role never calls it, and a node agent only calls it for a migration's
//! container operations, which the transfer tested here does not use.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mig_checkpoint::{EngineInfo, Store, WorkloadIdentity};
use mig_server::containerd::ContainerInfo;
use mig_server::registry::NodeInfo;
use mig_server::tls::client_builder;
use mig_server::transfer::error_chain;
use pki::TestCa;
use serde_json::{Value, json};
use tempfile::TempDir;

#[path = "support/pki.rs"]
mod pki;

const TOKEN: &str = "test-token-0123456789";
const BIN: &str = env!("CARGO_BIN_EXE_mig-server");
const NS: &str = "default";

/// The cluster's CA, one server certificate it signed for 127.0.0.1 and localhost, and a
/// second CA that signed nothing here; all in a temporary directory with the token file.
struct Pki {
    dir: TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    token: PathBuf,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().expect("tmp");
    let cluster_ca = TestCa::new(dir.path(), "ca");
    let (cert, key) = cluster_ca.issue("server", &["127.0.0.1", "localhost"]);
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).expect("token");
    Pki {
        ca: cluster_ca.cert,
        other_ca: TestCa::new(dir.path(), "other-ca").cert,
        cert,
        key,
        token,
        dir,
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// A `mig-server serve` child, killed on drop; its stderr goes to a file shown on failure.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Server {
    fn https(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(pki: &Pki) -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "MIG_TOKEN",
        "MIG_TOKEN_FILE",
        "MIG_TLS_CA",
        "MIG_TLS_CERT",
        "MIG_TLS_KEY",
        "MIG_CONTROLLER",
        "MIG_SERVER",
        "MIG_STATE_DIR",
        "MIG_NODE_NAME",
        "MIG_KUBE",
        "MIG_KUBECONFIG",
    ] {
        cmd.env_remove(var);
    }
    // Each server a state dir of its own (a controller's journal is locked to one process,
    // and remembers the nodes), unless the test names one with --state-dir.
    static STATE_DIRS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STATE_DIRS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    cmd.env("MIG_STATE_DIR", pki.dir.path().join(format!("state-{n}")));
    // Plain log lines (no colours) in the log files the tests read.
    cmd.env("RUST_LOG", "info,mig_server=debug")
        .env("NO_COLOR", "1")
        .arg("--token-file")
        .arg(&pki.token);
    cmd
}

/// Starts `mig-server serve` with TLS on a free loopback port and `args`, and waits until it
/// answers /healthz over https.
async fn serve(pki: &Pki, name: &str, args: &[&str]) -> Server {
    let port = free_port();
    let log = pki.dir.path().join(format!("{name}.log"));
    let child = command(pki)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--tls-cert")
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start mig-server");
    let mut server = Server { child, port, log };
    let http = trusting(Some(&pki.ca));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = http.get(format!("{}/healthz", server.https())).send().await;
        if answer.is_ok_and(|r| r.status().is_success()) {
            return server;
        }
        if let Some(status) = server.child.try_wait().expect("wait") {
            panic!("{name} exited ({status}) before serving:\n{}", server.log());
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not serve within 20s:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn controller(pki: &Pki) -> Server {
    serve(pki, "controller", &["--role", "controller"]).await
}

/// A node agent registering with `controller`, trusting `ca`; its containerd socket does not
/// exist, which only matters to container operations.
async fn node(pki: &Pki, name: &str, controller: &Server, ca: Option<&Path>) -> (Server, PathBuf) {
    let state = pki.dir.path().join(name);
    std::fs::create_dir_all(&state).expect("state dir");
    let mut args = vec![
        "--role".to_string(),
        "node".into(),
        "--node-name".into(),
        name.into(),
        "--controller".into(),
        controller.https(),
        "--state-dir".into(),
        state.display().to_string(),
        "--containerd-address".into(),
        pki.dir
            .path()
            .join("no-containerd.sock")
            .display()
            .to_string(),
    ];
    if let Some(ca) = ca {
        args.extend(["--tls-ca".to_string(), ca.display().to_string()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (serve(pki, name, &args).await, state)
}

fn trusting(ca: Option<&Path>) -> reqwest::Client {
    client_builder(ca)
        .expect("client")
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

async fn nodes(http: &reqwest::Client, controller: &Server) -> Vec<NodeInfo> {
    http.get(format!("{}/nodes", controller.https()))
        .send()
        .await
        .expect("GET /nodes")
        .json()
        .await
        .expect("nodes")
}

/// Waits until `name` is registered with `controller`.
async fn registered(http: &reqwest::Client, controller: &Server, name: &str) -> NodeInfo {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(n) = nodes(http, controller)
            .await
            .into_iter()
            .find(|n| n.name == name)
        {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not register within 20s:\n{}",
            controller.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cli(pki: &Pki, args: &[&str]) -> Output {
    command(pki).args(args).output().expect("run mig-server")
}

#[tokio::test]
async fn https_is_served_to_clients_that_trust_the_ca() {
    let pki = pki();
    let controller = controller(&pki).await;
    let http = trusting(Some(&pki.ca));
    for base in [
        controller.https(),
        format!("https://localhost:{}", controller.port),
    ] {
        let r = http
            .get(format!("{base}/healthz"))
            .send()
            .await
            .expect("GET /healthz over https");
        assert!(r.status().is_success(), "{base}: {}", r.status());
    }
    assert!(
        controller.log().contains("tls=true"),
        "{}",
        controller.log()
    );
    assert!(
        !controller.log().contains("TLS is off"),
        "{}",
        controller.log()
    );
}

/// A client that opens a new connection (a new handshake) for every request.
fn fresh_connections(ca: &Path) -> reqwest::Client {
    client_builder(Some(ca))
        .expect("client")
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

#[tokio::test]
async fn a_certificate_renewed_on_disk_is_served_without_a_restart() {
    let pki = pki();
    let controller = controller(&pki).await;
    let url = format!("{}/healthz", controller.https());
    let (old_ca, new_ca) = (fresh_connections(&pki.ca), fresh_connections(&pki.other_ca));
    assert!(new_ca.get(&url).send().await.is_err(), "not renewed yet");

    // The renewal, from another CA so a client can tell the two certificates apart, written
    // as a Secret volume update or a renewal job does: new files renamed over the old ones.
    let renewal = TestCa::new(pki.dir.path(), "renewal-ca");
    let (cert, key) = renewal.issue("renewed", &["127.0.0.1", "localhost"]);
    std::fs::rename(&cert, &pki.cert).expect("rename the certificate");
    std::fs::rename(&key, &pki.key).expect("rename the key");
    let renewed = fresh_connections(&renewal.cert);
    let deadline = Instant::now() + Duration::from_secs(10);
    while renewed.get(&url).send().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served within 10s:\n{}",
            controller.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let err = old_ca
        .get(&url)
        .send()
        .await
        .expect_err("the old certificate is gone");
    assert!(
        error_chain(&err).contains("UnknownIssuer"),
        "{}",
        error_chain(&err)
    );
    assert!(
        controller.log().contains("TLS certificate changed on disk"),
        "{}",
        controller.log()
    );

    // A broken renewal (a key that is not the certificate's) is refused: the last good pair
    // is still served, and the log says why.
    let (_, other_key) = renewal.issue("other", &["127.0.0.1"]);
    std::fs::rename(&other_key, &pki.key).expect("rename the key");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for _ in 0..3 {
        let r = renewed.get(&url).send().await.expect("still served");
        assert!(r.status().is_success());
    }
    assert!(
        controller
            .log()
            .contains("cannot be used; still using the one loaded before"),
        "{}",
        controller.log()
    );
}

#[tokio::test]
async fn clients_that_do_not_trust_the_ca_are_refused() {
    let pki = pki();
    let controller = controller(&pki).await;
    let url = format!("{}/healthz", controller.https());
    // The built-in web PKI roots, and a CA bundle of another CA: with --tls-ca, the bundle
    // is the only trust anchor.
    for ca in [None, Some(pki.other_ca.as_path())] {
        let e = trusting(ca)
            .get(&url)
            .send()
            .await
            .expect_err("a server certificate of an unknown CA was accepted");
        let chain = error_chain(&e);
        assert!(
            chain.contains("certificate") && chain.contains("UnknownIssuer"),
            "{ca:?}: {chain}"
        );
    }
}

#[tokio::test]
async fn plain_http_and_stalled_handshakes_do_not_stop_the_server() {
    let pki = pki();
    let controller = controller(&pki).await;
    // A client that connects and says nothing: its handshake must not hold up the others.
    let _stalled = tokio::net::TcpStream::connect(("127.0.0.1", controller.port))
        .await
        .expect("connect");
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    for _ in 0..3 {
        let answer = plain
            .get(format!("http://127.0.0.1:{}/healthz", controller.port))
            .send()
            .await;
        assert!(
            answer.is_err(),
            "plain http to the TLS port answered {answer:?}"
        );
    }
    let r = trusting(Some(&pki.ca))
        .get(format!("{}/healthz", controller.https()))
        .send()
        .await
        .expect("https after failed handshakes");
    assert!(r.status().is_success());
    let log = controller.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[tokio::test]
async fn the_cli_trusts_the_ca_it_is_given() {
    let pki = pki();
    let controller = controller(&pki).await;
    let server = controller.https();
    let ca = pki.ca.display().to_string();
    let out = cli(&pki, &["nodes", "--server", &server, "--tls-ca", &ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("NAME"));
    let out = cli(&pki, &["status", "--server", &server, "--tls-ca", &ca]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cli(&pki, &["nodes", "--server", &server]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("UnknownIssuer"),
        "{stderr}"
    );
    let out = command(&pki)
        .env("MIG_TLS_CA", &pki.ca)
        .args(["nodes", "--server", &server])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "MIG_TLS_CA: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        &pki,
        &[
            "nodes",
            "--server",
            &server,
            "--tls-ca",
            "/nonexistent/ca.pem",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("cannot read the CA bundle /nonexistent/ca.pem"),
        "{stderr}"
    );
}

#[tokio::test]
async fn bad_tls_files_stop_the_start_with_the_file_named() {
    let pki = pki();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let cert = pki.cert.display().to_string();
    let ca = pki.ca.display().to_string();
    // `serve` as a controller with `extra` flags: (succeeded, stderr).
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", "--role", "controller", "--listen", &listen];
        args.extend_from_slice(extra);
        let out = cli(&pki, &args);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The certificate given for the key.
    let (ok, stderr) = serve(&["--tls-cert", &cert, "--tls-key", &cert]);
    assert!(!ok, "{stderr}");
    assert!(
        stderr.contains("the TLS private key")
            && stderr.contains("server.pem holds no private key"),
        "{stderr}"
    );
    // A key of another certificate.
    let other_key = pki.dir.path().join("other-key.pem");
    std::fs::write(
        &other_key,
        rcgen::KeyPair::generate().expect("key").serialize_pem(),
    )
    .expect("write");
    let other_key = other_key.display().to_string();
    let (ok, stderr) = serve(&["--tls-cert", &cert, "--tls-key", &other_key]);
    assert!(
        !ok && stderr.contains("does not match the certificate"),
        "{stderr}"
    );
    // A certificate without its key is refused by the argument parser.
    let (ok, _) = serve(&["--tls-cert", &cert]);
    assert!(!ok);
    // An unreadable CA bundle, on the serving side too.
    let (ok, stderr) = serve(&["--tls-ca", &format!("{ca}.missing")]);
    assert!(
        !ok && stderr.contains("cannot read the CA bundle"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_node_agent_registers_over_https_and_advertises_https() {
    let pki = pki();
    let controller = controller(&pki).await;
    let (agent, _) = node(&pki, "node02", &controller, Some(&pki.ca)).await;
    let http = trusting(Some(&pki.ca));
    let info = registered(&http, &controller, "node02").await;
    assert_eq!(info.address, agent.https());
    let log = agent.log();
    assert!(log.contains("registered with the controller"), "{log}");
}

#[tokio::test]
async fn a_node_agent_without_the_ca_cannot_register() {
    let pki = pki();
    let controller = controller(&pki).await;
    let (agent, _) = node(&pki, "node03", &controller, None).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("controller unreachable") {
        assert!(Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(agent.log().contains("UnknownIssuer"), "{}", agent.log());
    let http = trusting(Some(&pki.ca));
    assert!(nodes(&http, &controller).await.is_empty());
}

/// A CA bundle changed on disk is trusted from the next connection on, without a restart:
/// an agent whose `--tls-ca` holds only another CA cannot register; once a bundle with the
/// cluster's CA is renamed over it (as a Secret volume update does), its retries get through.
#[tokio::test]
async fn a_ca_bundle_changed_on_disk_is_trusted_without_a_restart() {
    let pki = pki();
    let controller = controller(&pki).await;
    let bundle = pki.dir.path().join("bundle.pem");
    std::fs::copy(&pki.other_ca, &bundle).expect("bundle");
    let (agent, _) = node(&pki, "node04", &controller, Some(&bundle)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log().contains("UnknownIssuer") {
        assert!(Instant::now() < deadline, "{}", agent.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = [&pki.other_ca, &pki.ca]
        .iter()
        .map(|p| std::fs::read_to_string(p).expect("CA"))
        .collect::<String>();
    let tmp = pki.dir.path().join(".bundle.pem.new");
    std::fs::write(&tmp, rotated).expect("write");
    std::fs::rename(&tmp, &bundle).expect("rename");
    let http = trusting(Some(&pki.ca));
    let info = registered(&http, &controller, "node04").await;
    assert_eq!(info.address, agent.https());
    assert!(
        agent.log().contains("CA bundle changed on disk"),
        "{}",
        agent.log()
    );
}

/// The client side's verifier alone: each bundle on disk decides which certificates pass,
/// and a bundle that does not load leaves the CAs trusted before.
#[test]
fn the_trusted_cas_follow_the_bundle_on_disk() {
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let dir = tempfile::tempdir().expect("tmp");
    let (ca_a, ca_b) = (
        TestCa::new(dir.path(), "ca-a"),
        TestCa::new(dir.path(), "ca-b"),
    );
    let leaf = |ca: &TestCa, name: &str| {
        let (cert, _) = ca.issue(name, &["node01"]);
        CertificateDer::from_pem_file(cert).expect("leaf")
    };
    let (leaf_a, leaf_b) = (leaf(&ca_a, "leaf-a"), leaf(&ca_b, "leaf-b"));
    let bundle = dir.path().join("bundle.pem");
    let install = |contents: String| {
        let tmp = dir.path().join(".bundle.new");
        std::fs::write(&tmp, contents).expect("write");
        std::fs::rename(&tmp, &bundle).expect("rename");
    };
    let pem = |ca: &TestCa| std::fs::read_to_string(&ca.cert).expect("CA");
    install(pem(&ca_a));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let cas = mig_server::tls::TrustedCas::load(&bundle, provider, Duration::ZERO).expect("load");
    let name = ServerName::try_from("node01").expect("name");
    let passes = |leaf: &CertificateDer<'_>| {
        cas.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
            .is_ok()
    };
    assert_eq!(
        (passes(&leaf_a), passes(&leaf_b)),
        (true, false),
        "bundle A"
    );
    install(pem(&ca_a) + &pem(&ca_b));
    assert_eq!(
        (passes(&leaf_a), passes(&leaf_b)),
        (true, true),
        "bundle A+B"
    );
    install(pem(&ca_b));
    assert_eq!(
        (passes(&leaf_a), passes(&leaf_b)),
        (false, true),
        "bundle B"
    );
    install("not a certificate\n".into());
    assert_eq!(
        (passes(&leaf_a), passes(&leaf_b)),
        (false, true),
        "a broken bundle keeps B"
    );
}

/// A committed checkpoint of `id` in the origin's store, and the container record the origin
/// keeps for `migration` (what its checkpoint step leaves behind).
fn checkpoint_on(state: &Path, migration: &str, id: &str, payload: &[u8]) -> WorkloadIdentity {
    let identity = WorkloadIdentity::container(NS, id).expect("identity");
    let store = Store::open(state.join("checkpoints")).expect("store");
    let writer = store.begin(&identity).expect("begin");
    let images = writer.images_dir().expect("images");
    std::fs::write(images.join("pages-1.img"), payload).expect("write");
    writer
        .commit(EngineInfo::new("criu", "4.2.1"), "busybox")
        .expect("commit");
    let info = ContainerInfo {
        namespace: NS.into(),
        id: id.into(),
        image: "docker.io/library/busybox:latest".into(),
        runtime: "io.containerd.mig.v2".into(),
        labels: [("mig.dev/workload".to_string(), id.to_string())].into(),
        spec: json!({"process": {"args": ["sh"]}}),
    };
    let dir = state.join("migrations").join(migration);
    std::fs::create_dir_all(&dir).expect("migration dir");
    std::fs::write(
        dir.join(format!("{}.json", identity.safe_key())),
        serde_json::to_vec(&info).expect("json"),
    )
    .expect("record");
    identity
}

async fn send(
    http: &reqwest::Client,
    origin: &Server,
    migration: &str,
    id: &str,
    dest: &Server,
) -> reqwest::Response {
    http.post(format!("{}/agent/v1/send", origin.https()))
        .bearer_auth(TOKEN)
        .json(&json!({
            "migration": migration, "namespace": NS, "containers": [id],
            "destination": dest.https(), "live": false,
        }))
        .send()
        .await
        .expect("POST /agent/v1/send")
}

#[tokio::test]
async fn a_checkpoint_streams_from_agent_to_agent_over_https() {
    let pki = pki();
    let controller = controller(&pki).await;
    let payload: Vec<u8> = (0..512 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    // What the origin's checkpoint step would have left: a committed checkpoint and its record.
    let origin_state = pki.dir.path().join("node01");
    let identity = checkpoint_on(&origin_state, "m1", "counter", &payload);
    let (origin, _) = node(&pki, "node01", &controller, Some(&pki.ca)).await;
    let (dest, dest_state) = node(&pki, "node02", &controller, Some(&pki.ca)).await;
    let http = trusting(Some(&pki.ca));

    let r = send(&http, &origin, "m1", "counter", &dest).await;
    let status = r.status();
    let body: Value = r.json().await.expect("summary");
    assert!(
        status.is_success(),
        "{status}: {body}\norigin:\n{}\ndestination:\n{}",
        origin.log(),
        dest.log()
    );
    let raw = body["raw_bytes"].as_u64().unwrap_or_default();
    assert!(raw >= payload.len() as u64, "{body}");
    let received = Store::open(dest_state.join("checkpoints"))
        .expect("store")
        .pending(&identity)
        .expect("pending")
        .expect("the destination has the checkpoint");
    received.verify().expect("the received checkpoint verifies");
    let pages = std::fs::read(received.images_dir().join("pages-1.img"));
    assert_eq!(pages.expect("pages").len(), payload.len());

    // An origin that does not trust the destination's CA refuses to send to it.
    let other_state = pki.dir.path().join("node04");
    checkpoint_on(&other_state, "m2", "other", &payload);
    let (untrusting, _) = node(&pki, "node04", &controller, Some(&pki.other_ca)).await;
    let r = send(&http, &untrusting, "m2", "other", &dest).await;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, reqwest::StatusCode::BAD_GATEWAY, "{body}");
    assert!(body.contains("UnknownIssuer"), "{body}");
}

#[tokio::test]
async fn post_copy_pages_are_piped_from_agent_to_agent_over_https() {
    use mig_server::auth::Token;
    use mig_server::pages::{PagesOrigin, pipe_to_origin};
    use mig_server::protocol::PagesRequest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let pki = pki();
    let controller = controller(&pki).await;
    let origin_state = pki.dir.path().join("node01");
    let identity = checkpoint_on(&origin_state, "m1", "counter", b"no pages");
    let (origin, _) = node(&pki, "node01", &controller, Some(&pki.ca)).await;
    // The origin shim's page server.
    let pages = origin_state.join("pages");
    std::fs::create_dir_all(&pages).expect("pages dir");
    let listener =
        tokio::net::UnixListener::bind(pages.join(format!("{}.sock", identity.safe_key())))
            .expect("bind");
    let from = PagesOrigin {
        http: client_builder(Some(&pki.ca))
            .expect("client")
            .build()
            .expect("client"),
        token: Token::new(TOKEN, "test").expect("token"),
        url: origin.https(),
    };
    let req = PagesRequest {
        migration: "m1".into(),
        namespace: NS.into(),
        id: "counter".into(),
    };
    let (shim_end, mut dest_shim) = tokio::net::UnixStream::pair().expect("pair");
    let piping = tokio::spawn(async move { pipe_to_origin(shim_end, &from, &req).await });
    let (mut origin_shim, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap_or_else(|_| panic!("the origin agent did not connect:\n{}", origin.log()))
        .expect("accept");
    dest_shim.write_all(b"fault").await.expect("write");
    let mut got = [0u8; 5];
    origin_shim.read_exact(&mut got).await.expect("read");
    assert_eq!(&got, b"fault");
    let page = vec![7u8; 256 * 1024];
    origin_shim.write_all(&page).await.expect("write");
    drop(origin_shim);
    let mut got = Vec::new();
    dest_shim.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, page);
    drop(dest_shim);
    let piped = tokio::time::timeout(Duration::from_secs(10), piping)
        .await
        .expect("the pipe ends")
        .expect("join");
    assert_eq!(piped, Ok((5, page.len() as u64)), "{}", origin.log());
}
