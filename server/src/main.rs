//! `mig-server`: `serve` runs the node agent and/or the controller; `migrate`, `status` and
//! `nodes` are clients of the controller's REST API.

mod cli;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::serve::ListenerExt;
use clap::{Parser, Subcommand, ValueEnum};
use mig_server::agent::{AgentConfig, NodeAgent};
use mig_server::agent_routes::AgentState;
use mig_server::auth::Token;
use mig_server::containerd::{Ctr, Grpc};
use mig_server::controller::{Controller, ControllerConfig};
use mig_server::journal::{Journal, JournalError};
use mig_server::kube::client::{HttpKube, KubeConfig};
use mig_server::node_client::HttpNodes;
use mig_server::tls;
use mig_server::transfer::error_chain;
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "mig-server",
    version,
    about = "kubernetes-mig: stateful container migration"
)]
struct Args {
    /// File holding the bearer token (default: the MIG_TOKEN environment variable).
    #[arg(long, global = true, env = "MIG_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM bundle of the CAs trusted when calling the controller or other agents over https;
    /// when given, the only ones (the built-in web PKI roots are not trusted then).
    #[arg(long, global = true, env = "MIG_TLS_CA")]
    tls_ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// Node agent and controller in one process (a single machine).
    All,
    /// Node agent only; registers with --controller.
    Node,
    /// Controller only.
    Controller,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Migrate a workload and show its progress.
    Migrate(cli::MigrateArgs),
    /// Show one migration, or all.
    Status(cli::StatusArgs),
    /// List registered nodes.
    Nodes(cli::ServerArg),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Which parts to run.
    #[arg(long, value_enum, default_value = "all")]
    role: Role,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This node's name (node role).
    #[arg(long, env = "MIG_NODE_NAME", default_value = "node01")]
    node_name: String,
    /// URL other agents and the controller reach this agent at (default:
    /// <node-scheme>://<listen>).
    #[arg(long)]
    advertise_url: Option<String>,
    /// Serve TLS with this PEM certificate chain (this server's certificate first); its
    /// names (IP or DNS) must match the address the others reach this server at.
    #[arg(long, env = "MIG_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "MIG_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Controller to register with (node role).
    #[arg(long, env = "MIG_CONTROLLER")]
    controller: Option<String>,
    /// containerd socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_address: PathBuf,
    /// Default containerd namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// State dir shared with the shim (checkpoints/, marks/). The controller journals its
    /// migrations and the registered nodes in <state-dir>/controller/ (0700; each record
    /// written atomically, 0600; one controller per state dir): a controller restarted on it
    /// answers GET /migrations and GET /nodes as before, and resolves the migrations it left
    /// unfinished, finishing those the destination already runs and rolling the others back
    /// to their origin.
    #[arg(long, env = "MIG_STATE_DIR", default_value = "/var/lib/kubernetes-mig")]
    state_dir: PathBuf,
    /// Where migrations' checkpoints are written when the node has the memory for them (a
    /// tmpfs): empty for the default, a directory per state dir under
    /// /dev/shm/kubernetes-mig (what the shim uses too); `off` to always write them to disk.
    /// Must be the shim's (its runtime option MemoryDir, or MIG_MEMORY_DIR).
    #[arg(long, env = "MIG_MEMORY_DIR", default_value = "")]
    memory_dir: String,
    /// Runtime type migrated containers have and are restored with.
    #[arg(long, default_value = "io.containerd.mig.v2")]
    runtime: String,
    /// zstd level of checkpoint streams.
    #[arg(long, default_value_t = 1)]
    zstd_level: i32,
    /// Seconds to wait for a task to stop after its checkpoint, or to run after a restore.
    #[arg(long, default_value_t = 300)]
    wait_timeout_secs: u64,
    /// Seconds after which a migration fails and rolls back.
    #[arg(long, default_value_t = 900)]
    migration_timeout_secs: u64,
    /// Controller: stream each checkpoint while the origin writes it (true), or after it.
    #[arg(long, env = "MIG_STREAM_DURING_CHECKPOINT", default_value_t = true, action = clap::ArgAction::Set)]
    stream_during_checkpoint: bool,
    /// Scheme for node addresses registered without one, and of the default --advertise-url
    /// (default: https with --tls-cert, else http).
    #[arg(long)]
    node_scheme: Option<String>,
    /// Kubernetes mode (controller): migrate Deployments through the API server, with the
    /// pod's service account (`--kube`) or a kubeconfig (`--kubeconfig PATH`).
    #[arg(long, env = "MIG_KUBE")]
    kube: bool,
    /// Kubeconfig for Kubernetes mode (implies --kube); single context, e.g. from
    /// `kubectl config view --minify --flatten --raw`.
    #[arg(long, env = "MIG_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Milliseconds between pod listings while a Kubernetes migration waits.
    #[arg(long, default_value_t = 1000)]
    kube_poll_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let token = || Token::load(args.token_file.as_deref()).context("loading the bearer token");
    let ca = args.tls_ca.as_deref();
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        match args.command {
            Command::Serve(serve_args) => serve(*serve_args, token()?, ca).await,
            Command::Migrate(a) => cli::migrate(a, &token()?, ca).await,
            Command::Status(a) => cli::status(a, ca).await,
            Command::Nodes(a) => cli::nodes(a, ca).await,
        }
    })
}

async fn serve(args: ServeArgs, token: Token, ca: Option<&Path>) -> Result<()> {
    // Loaded first: a bad certificate or key stops the start before anything else happens.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let node_scheme = args
        .node_scheme
        .clone()
        .unwrap_or_else(|| if tls.is_some() { "https" } else { "http" }.to_string());
    let advertise = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{node_scheme}://{}", args.listen));
    let http = tls::client_builder(ca)?
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("building the HTTP client")?;
    let runs_agent = args.role != Role::Controller;
    let agent = if runs_agent {
        // Task operations over containerd's gRPC API, container records through ctr.
        let containerd = Grpc::new(Ctr::new(
            &args.containerd_address,
            Duration::from_secs(args.wait_timeout_secs),
        ));
        let agent = NodeAgent::new(
            AgentConfig {
                name: args.node_name.clone(),
                state_dir: args.state_dir.clone(),
                runtime: args.runtime.clone(),
                zstd_level: args.zstd_level,
                wait_timeout: Duration::from_secs(args.wait_timeout_secs),
                memory_dir: mig_checkpoint::room::memory_dir(&args.memory_dir, &args.state_dir),
            },
            Arc::new(containerd),
        )
        .with_context(|| format!("opening the state dir {}", args.state_dir.display()))?;
        agent.remove_unstarted_prepared().await;
        Some(AgentState {
            agent: Arc::new(agent),
            http: http.clone(),
            token: token.clone(),
        })
    } else {
        None
    };
    let kube = if args.role == Role::Node || !(args.kube || args.kubeconfig.is_some()) {
        None
    } else {
        let config = match &args.kubeconfig {
            Some(path) => KubeConfig::from_kubeconfig(path),
            None => KubeConfig::in_cluster(),
        }
        .context("loading Kubernetes credentials")?;
        info!(server = %config.server, "kubernetes mode");
        Some(HttpKube::new(&config).context("building the Kubernetes client")?)
    };
    let controller = if args.role != Role::Node {
        let mut controller = Controller::new(
            ControllerConfig {
                default_namespace: args.namespace.clone(),
                default_scheme: node_scheme.clone(),
                migration_timeout: Duration::from_secs(args.migration_timeout_secs),
                stream_during_checkpoint: args.stream_during_checkpoint,
            },
            Arc::new(HttpNodes::new(
                http.clone(),
                token.clone(),
                Duration::from_secs(args.migration_timeout_secs),
            )),
        );
        if let Some(kube) = kube {
            controller =
                controller.with_kube(Arc::new(kube), Duration::from_millis(args.kube_poll_ms));
        }
        match Journal::open(&args.state_dir) {
            Ok(journal) => controller = controller.with_journal(journal),
            // Two controllers on one journal would resolve each other's migrations.
            Err(e @ JournalError::Locked { .. }) => return Err(e.into()),
            // A controller without a writable state dir (a read-only container, say) still
            // migrates; it only cannot resolve what a restart interrupts.
            Err(e) => error!(
                error = %e,
                "the controller's journal is OFF: records are kept in memory only, and a \
                 migration interrupted by a restart of this controller is not resolved; give \
                 it a writable --state-dir"
            ),
        }
        let controller = Arc::new(controller);
        if runs_agent {
            controller
                .register_node(&args.node_name, &advertise)
                .map_err(|e| anyhow::anyhow!("registering the local node: {e}"))?;
        }
        Some(controller)
    } else {
        None
    };
    if args.role == Role::Node {
        let Some(url) = args.controller.clone() else {
            bail!("--role node needs --controller URL to register with");
        };
        tokio::spawn(register_loop(
            http.clone(),
            token.clone(),
            url,
            args.node_name.clone(),
            advertise.clone(),
        ));
    }
    let app = mig_server::app(controller.clone(), agent, token);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    info!(listen = %args.listen, %advertise, node = %args.node_name, tls = tls.is_some(),
          "mig-server serving");
    if let Some(controller) = &controller {
        // Once listening: in --role all the local agent is one of the nodes to ask.
        controller.resume_interrupted();
    }
    match tls {
        Some(config) => run(tls::TlsListener::new(listener, config), app).await,
        None => {
            warn!(
                "TLS is off: every request to this server, the bearer token and checkpoint \
                 streams (process memory) included, travels unencrypted; serve with --tls-cert \
                 and --tls-key (README, TLS)"
            );
            run(listener.tap_io(no_delay), app).await
        }
    }
}

/// Small messages go out at once: a post-copy migration's page requests (24 bytes each) cross
/// the node agents' connection one by one, and Nagle's algorithm would hold each back for a
/// delayed ACK (40 ms).
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}

async fn run<L>(listener: L, app: axum::Router) -> Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving HTTP")
}

/// Registers this agent with the controller, every 2 s until it answers, then again every
/// 30 s: registration is idempotent, and a controller that lost its journal (or moved)
/// learns the node again within that time.
async fn register_loop(
    http: reqwest::Client,
    token: Token,
    controller: String,
    name: String,
    address: String,
) {
    let url = format!("{}/register", controller.trim_end_matches('/'));
    let mut registered_before = false;
    loop {
        let result = http
            .post(&url)
            .bearer_auth(token.secret())
            .json(&serde_json::json!({"name": name, "address": address}))
            .send()
            .await;
        let registered = match result {
            Ok(r) if r.status().is_success() => {
                if !registered_before {
                    info!(%url, "registered with the controller");
                }
                true
            }
            Ok(r) => {
                warn!(%url, status = %r.status(), "controller refused registration");
                false
            }
            Err(e) => {
                // The chain: reqwest's own message does not say why (refused, a certificate).
                warn!(%url, error = %error_chain(&e), "controller unreachable; retrying");
                false
            }
        };
        registered_before = registered;
        let pause = if registered { 30 } else { 2 };
        tokio::time::sleep(Duration::from_secs(pause)).await;
    }
}
