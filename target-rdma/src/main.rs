//! target-rdma: a user-space iSCSI and iSER block storage target.
//!
//! This binary reads the command line and config file (`config`), builds
//! the SCSI targets and their backstores, and runs the engine (`engine`):
//! transport -> iSCSI session -> SCSI LUN -> backstore -> completion -> back
//! out on the same reactor.

#![forbid(unsafe_code)]

mod config;
mod engine;
mod guard;
mod iser;

/// Counts heap allocations per thread, so each reactor can report that
/// its I/O path allocates nothing (see `engine::CoreStats`).
#[global_allocator]
static HEAP: mempool::HeapCount = mempool::HeapCount;

use std::process::ExitCode;
use std::time::Duration;

use config::{BackstoreSpec, Config};
use engine::{EngineConfig, ExportedTarget, Portal};
use iscsi::login::ChapConfig;
use iscsi::params::TargetLimits;
use scsi::backstore::{Backstore, FileBackstore, FileOptions, MemBackstore, NullBackstore};
use scsi::{Lun, LunInfo};

fn main() -> ExitCode {
    let cfg = match config::load(std::env::args_os()) {
        Ok(c) => c,
        // Prints help, version and the example config to stdout with
        // status 0, and errors to stderr with status 2.
        Err(e) => e.exit(),
    };
    init_logging(&cfg.log_level);
    match run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::Config(e)) => {
            eprintln!("target-rdma: {e}");
            ExitCode::from(2)
        }
        Err(RunError::Failed(e)) => {
            eprintln!("target-rdma: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the target did not run: a configuration that cannot work (status
/// 2, as for a bad flag), or a failure while starting or running.
enum RunError {
    Config(String),
    Failed(String),
}

impl From<String> for RunError {
    fn from(e: String) -> Self {
        RunError::Failed(e)
    }
}

impl From<&str> for RunError {
    fn from(e: &str) -> Self {
        RunError::Failed(e.into())
    }
}

/// The backstore as a message names it.
fn describe(b: &BackstoreSpec) -> String {
    match b {
        BackstoreSpec::Mem { .. } => "mem".into(),
        BackstoreSpec::Null { .. } => "null".into(),
        BackstoreSpec::File { path, .. } => format!("file {}", path.display()),
        BackstoreSpec::Gluster { url, .. } => url.to_string(),
    }
}

/// A LUN's size must hold at least one block and end on a block
/// boundary: a tail that no LBA reaches would be dropped silently.
fn check_lun_size(size: u64, block_size: u32) -> Result<(), String> {
    let bs = block_size as u64;
    if size < bs {
        return Err(format!(
            "size: {size} bytes is less than one {bs}-byte block"
        ));
    }
    if !size.is_multiple_of(bs) {
        return Err(format!(
            "size: {size} bytes is not a multiple of the {bs}-byte block size \
             ({} bytes would be unreachable; give size={})",
            size % bs,
            size - size % bs
        ));
    }
    Ok(())
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(cfg: Config) -> Result<(), RunError> {
    let mut targets = Vec::new();
    for (ti, t) in cfg.targets.iter().enumerate() {
        let mut device = scsi::Target::new();
        for l in &t.luns {
            let where_ = format!("target {} LUN {}", t.name, l.lun);
            let backstore: Box<dyn Backstore> = match &l.backstore {
                BackstoreSpec::Mem { size } => Box::new(
                    MemBackstore::new(*size)
                        .map_err(|e| format!("{where_}: RAM LUN of {size} bytes: {e}"))?,
                ),
                BackstoreSpec::Null { size } => Box::new(NullBackstore::new(*size)),
                BackstoreSpec::Gluster { url, size } => {
                    let opts = backstore_gfapi::ConnectOptions {
                        init_timeout: Duration::from_secs(cfg.command_timeout_s as u64),
                        ping_timeout_s: (cfg.command_timeout_s / 2).max(1),
                        log_file: cfg.gluster_log_file.clone(),
                        ..backstore_gfapi::ConnectOptions::default()
                    };
                    let vol = backstore_gfapi::Volume::connect(&url.volume, &url.servers, &opts)
                        .map_err(|e| format!("{where_}: {url}: {e}"))?;
                    let image = backstore_gfapi::ImageOptions {
                        command_timeout: Duration::from_secs(cfg.command_timeout_s as u64),
                    };
                    Box::new(
                        backstore_gfapi::GlusterBackstore::open(vol, &url.path, *size, image)
                            .map_err(|e| format!("{where_}: {url}: {e}"))?,
                    )
                }
                BackstoreSpec::File { path, size, direct } => {
                    let opts = FileOptions {
                        direct: *direct,
                        ..FileOptions::default()
                    };
                    Box::new(
                        FileBackstore::open_opts(path, *size, opts)
                            .map_err(|e| format!("{where_}: {}: {e}", path.display()))?,
                    )
                }
            };
            // Where the LUN keeps what must outlive the process.
            let state_file = |ext: &str| {
                cfg.pr_dir
                    .join(format!("{}-lun{}.{ext}", sanitize(&t.name), l.lun))
            };
            let size = backstore.size_bytes();
            check_lun_size(size, l.block_size).map_err(|e| {
                RunError::Config(format!("{where_} ({}): {e}", describe(&l.backstore)))
            })?;
            let serial = l
                .serial
                .clone()
                .unwrap_or_else(|| format!("trdma{ti:02x}{:04x}", l.lun));
            let info = LunInfo {
                lun: l.lun,
                block_size: l.block_size,
                num_blocks: size / l.block_size as u64,
                vendor: "TRDMA".into(),
                product: format!("{} LUN", backstore.kind()),
                revision: "0001".into(),
                naa: naa_for(&t.name, l.lun),
                serial,
                thin_provisioned: backstore.caps().discard,
                read_only: l.read_only,
                removable: l.removable,
                write_cache: l.write_cache,
                pr_file: Some(state_file("pr")),
                mode_file: Some(state_file("mode")),
                max_transfer_blocks: (16 * 1024 * 1024 / l.block_size).max(1),
                max_unmap_blocks: u32::MAX,
                max_unmap_descriptors: 256,
                max_write_same_blocks: (64 * 1024 * 1024 / l.block_size as u64).max(1),
            };
            let lun = Lun::new(info, backstore).map_err(|e| format!("{where_}: {e}"))?;
            device.add_lun(lun);
        }
        targets.push(ExportedTarget {
            name: t.name.clone(),
            allow: t.allow.clone(),
            chap: ChapConfig {
                initiator: t.chap.as_ref().map(|c| (c.user.clone(), c.secret.clone())),
                target: t
                    .mutual_chap
                    .as_ref()
                    .map(|c| (c.user.clone(), c.secret.clone())),
            },
            device,
        });
    }
    let portals: Vec<Portal> = cfg
        .portals
        .iter()
        .filter(|p| p.transport != config::Transport::Iser)
        .map(|p| Portal {
            addr: p.addr,
            tpgt: p.tpgt,
        })
        .collect();
    let iser_portals: Vec<Portal> = cfg
        .portals
        .iter()
        .filter(|p| p.transport == config::Transport::Iser)
        .map(|p| Portal {
            addr: p.addr,
            tpgt: p.tpgt,
        })
        .collect();
    if portals.is_empty() {
        return Err("no TCP portal to listen on".into());
    }
    let limits = TargetLimits {
        queue_depth: cfg.queue_depth,
        ..TargetLimits::default()
    };
    let ecfg = EngineConfig {
        limits,
        nop_interval_ms: cfg.nop_interval_s as u64 * 1000,
        nop_timeout_ms: cfg.nop_timeout_s as u64 * 1000,
        max_sessions: cfg.max_sessions as usize,
        max_login_connections: 1024,
        data_pool_bytes: (cfg.buffer_pool_mib as usize) << 20,
        buffer_sg: cfg.buffer_sg,
        poll: cfg.poll,
        poll_coalesce: std::time::Duration::from_micros(cfg.poll_coalesce_us.into()),
        cores: reactor_cores(cfg.cores.as_deref()),
        pin: true,
        stats_file: cfg.stats_file.clone(),
        iser_portals,
        // Read from the environment, not the command line: a developer's
        // tool, used by tests/perf/no_alloc.sh.
        trace_allocs: std::env::var("TARGET_RDMA_TRACE_ALLOCS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        discovery_chap: ChapConfig {
            initiator: cfg
                .discovery_chap
                .as_ref()
                .map(|c| (c.user.clone(), c.secret.clone())),
            target: None,
        },
    };
    if cfg.discovery_chap.is_none() && cfg.targets.iter().any(|t| t.chap.is_some()) {
        // Logins hide target names from those without a secret (README,
        // "Failed logins and login floods"); discovery would list them.
        tracing::warn!(
            "targets require CHAP but discovery does not (--discovery-chap): \
             SendTargets names them to any initiator"
        );
    }
    let reactors = ecfg.cores.len();
    let engine = engine::Engine::new(ecfg, targets, portals).map_err(|e| e.to_string())?;
    tracing::info!(reactors, poll = ?cfg.poll, "engine ready");
    for addr in engine.local_addrs() {
        for t in &cfg.targets {
            for l in &t.luns {
                tracing::info!("serving iscsi://{addr}/{}/{}", t.name, l.lun);
            }
        }
    }
    if let (Some(addr), Some(t)) = (engine.local_addrs().first(), cfg.targets.first()) {
        println!("target-rdma: listening on {addr}");
        println!("  libiscsi:   iscsi-inq iscsi://{addr}/{}/0", t.name);
        println!(
            "  open-iscsi: iscsiadm -m discovery -t st -p {addr} && iscsiadm -m node -T {} -p {addr} --login",
            t.name
        );
    }
    Ok(engine.run().map_err(|e| e.to_string())?)
}

/// One reactor per CPU of `--cores`; without it, one per CPU this process
/// may run on (its affinity mask, as `taskset` or a cgroup set it).
fn reactor_cores(cores: Option<&[usize]>) -> Vec<usize> {
    let mut list = match cores {
        Some(c) => c.to_vec(),
        None => config::affinity_cpus().unwrap_or_default(),
    };
    if list.is_empty() {
        list.push(0);
    }
    list.truncate(engine::CORES_MAX);
    list
}

/// A stable NAA type 6 (IEEE Registered Extended) identifier derived from
/// the target name and LUN, so a LUN keeps its identity across restarts.
fn naa_for(target: &str, lun: u64) -> [u8; 16] {
    // FNV-1a over the name and LUN: stable, no dependency, and only needs
    // to be unique among this host's LUNs.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in target.bytes().chain(lun.to_be_bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let mut naa = [0u8; 16];
    // NAA 6, then a 24-bit company ID from the locally administered range
    // (0x0 with the private-use marker), then vendor-specific bits.
    naa[0] = 0x60;
    naa[1] = 0x01;
    naa[2] = 0x40;
    naa[3] = 0x50;
    naa[4..12].copy_from_slice(&h.to_be_bytes());
    naa[12..16].copy_from_slice(&(lun as u32).to_be_bytes());
    naa
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::check_lun_size;

    #[test]
    fn lun_sizes_below_a_block_or_off_its_boundary_are_refused() {
        assert!(check_lun_size(100, 512)
            .unwrap_err()
            .contains("less than one 512-byte block"));
        assert!(check_lun_size(1000, 512)
            .unwrap_err()
            .contains("not a multiple of the 512-byte block size"));
        assert!(check_lun_size(4096, 4096).is_ok() && check_lun_size(1536, 512).is_ok());
        assert!(check_lun_size(0, 512).is_err() && check_lun_size(6144, 4096).is_err());
    }
}
