//! Command line and config file of the `target-rdma` binary.
//!
//! [`load`] parses the command line (clap), reads the `--config` TOML file if
//! one is named, merges the two, validates everything and returns a plain
//! [`Config`] for the engine. Every error names where the bad value came
//! from (the flag, or the file and the field) and why it was refused.
//!
//! Merge rules when `--config` and flags are used together:
//! - settings flags (`--log-level`, `--cores`, `--queue-depth`,
//!   `--max-sessions`, `--pr-dir`, `--nop-interval-s`, `--nop-timeout-s`,
//!   `--command-timeout-s`, `--gluster-log-file`,
//!   `--discovery-chap`) override the file's value;
//! - `--portal` flags replace the file's `portals` list;
//! - target flags (`--target`, `--alias`, `--lun`, `--allow`, `--chap`,
//!   `--mutual-chap`) act on one target: the file's target named by
//!   `--target`, or a new target if the file has no target of that name, or
//!   the file's only target when `--target` is absent. `--lun` and `--allow`
//!   add to that target (new LUNs are numbered after its highest LUN);
//!   `--alias`, `--chap` and `--mutual-chap` replace its values. When the
//!   file has several targets, target flags need `--target`.
//!
//! Defaults: with no portals anywhere, 127.0.0.1:3260 (TCP); with no targets
//! anywhere, one target [`DEFAULT_TARGET_NAME`]; a target made from flags
//! alone without `--lun` gets one 1 GiB RAM LUN (`mem:1GiB`).
//!
//! Relative paths in the config file (`path` of file LUNs, `pr_dir`) are taken
//! relative to the config file's directory; relative paths given as flags are
//! left as they are (relative to the working directory).

// The binary uses only part of this module's public surface.
#![allow(dead_code)]

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use backstore_gfapi::GlusterUrl;
use clap::Parser;
use serde::Deserialize;

pub use iscsi::params::Transport;

/// Target name used when neither flags nor the config file name a target.
pub const DEFAULT_TARGET_NAME: &str = "iqn.2026-11.io.target-rdma:default";
/// Portal used when neither flags nor the config file name a portal.
pub const DEFAULT_PORTAL: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3260);
/// The LUN a target made from flags alone gets when no `--lun` is given.
pub const DEFAULT_LUN_SPEC: &str = "mem:1GiB";
/// The iSCSI well-known port, used when a portal names no port.
pub const ISCSI_PORT: u16 = 3260;
pub const DEFAULT_LOG_LEVEL: &str = "info";
pub const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];
pub const DEFAULT_QUEUE_DEPTH: u32 = 128;
pub const MAX_QUEUE_DEPTH: u32 = 4096;
pub const DEFAULT_MAX_SESSIONS: u32 = 64;
/// TSIH is 16 bits and 0 is reserved.
pub const MAX_MAX_SESSIONS: u32 = 65535;
/// 0 turns the NOP-In pings off.
pub const DEFAULT_NOP_INTERVAL_S: u32 = 30;
pub const DEFAULT_NOP_TIMEOUT_S: u32 = 30;
pub const MAX_NOP_S: u32 = 3600;
/// Receive coalescing under adaptive polling (`--poll-coalesce-us`): long
/// enough for a pipelining initiator's next few commands to arrive, short
/// against the time a queue of them takes (see the engine's
/// `COALESCE_PROBE_EVERY`).
pub const DEFAULT_POLL_COALESCE_US: u32 = 80;
pub const MAX_POLL_COALESCE_US: u32 = 1000;
/// Bound on one backstore operation of a network backstore (Gluster):
/// above gluster's client ping-timeout (half of this, so 10 s) and below
/// the 30 s an initiator such as Linux waits before aborting a command.
pub const DEFAULT_COMMAND_TIMEOUT_S: u32 = 20;
/// Lowest command timeout: its half, the ping-timeout, must be a whole
/// second.
pub const MIN_COMMAND_TIMEOUT_S: u32 = 2;
pub const MAX_COMMAND_TIMEOUT_S: u32 = 3600;
/// Preferred directory for persistent reservation (APTPL) state.
pub const DEFAULT_PR_DIR: &str = "/var/lib/target-rdma";
pub const DEFAULT_BLOCK_SIZE: u32 = 512;
/// Target portal group tag of every portal unless the config file says otherwise.
pub const DEFAULT_TPGT: u16 = 1;
/// Highest LUN number (SAM flat space addressing, 14 bits).
pub const MAX_LUN: u64 = 16383;
/// Highest core number accepted by `--cores`.
pub const MAX_CORE: usize = 4095;
/// RFC 7143 9.2.1: CHAP secrets must be at least 96 bits.
pub const MIN_CHAP_SECRET: usize = 12;
pub const MAX_CHAP_SECRET: usize = 255;

const SIZE_HINT: &str = "use forms such as 4k, 64MiB, 1GiB";

// ---------------------------------------------------------------------------
// The validated result
// ---------------------------------------------------------------------------

/// Everything the engine needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub targets: Vec<TargetConfig>,
    /// Where to listen; every target is reachable on every portal.
    pub portals: Vec<PortalConfig>,
    /// One of [`LOG_LEVELS`].
    pub log_level: String,
    /// CPUs to run one pinned reactor each on, in the order given; `None`:
    /// every CPU in the process's affinity mask.
    pub cores: Option<Vec<usize>>,
    /// Per-session command window (MaxCmdSN - ExpCmdSN + 1).
    pub queue_depth: u32,
    /// MiB of hugepage memory for command data, mapped at start-up and
    /// shared by every reactor; a command finding its buffer class empty
    /// waits for a buffer.
    pub buffer_pool_mib: u32,
    /// When a command's data may span several smaller buffers.
    pub buffer_sg: BufferSg,
    pub max_sessions: u32,
    /// Directory for persistent reservation APTPL state (may not exist yet).
    pub pr_dir: PathBuf,
    /// Seconds of idleness before the target sends a NOP-In; 0 = never.
    pub nop_interval_s: u32,
    /// Seconds to wait for the NOP-Out answer before dropping the connection.
    pub nop_timeout_s: u32,
    /// CHAP credentials initiators must present for discovery sessions.
    pub discovery_chap: Option<ChapPair>,
    /// How reactors wait for work.
    pub poll: PollMode,
    /// Adaptive polling: the pause between batches of small commands
    /// arriving one per read (receive coalescing); 0: never pause.
    pub poll_coalesce_us: u32,
    /// Where to write per-core and per-LUN counters (JSON, every second).
    pub stats_file: Option<PathBuf>,
    /// Gluster LUNs: an operation not finished within this many seconds
    /// completes with an error (retryable sense); gluster's client
    /// ping-timeout is set to half of it.
    pub command_timeout_s: u32,
    /// Where libgfapi logs; `None`: standard error.
    pub gluster_log_file: Option<PathBuf>,
}

/// How a reactor waits for work (`--poll`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollMode {
    /// Never sleep: lowest latency, one core fully busy per reactor.
    Busy,
    /// Spin while work keeps arriving, sleep in the kernel after an idle
    /// budget, so a reactor sharing its core with other work does not
    /// starve it.
    Adaptive,
    /// Always sleep until a socket or timer wakes the reactor.
    Interrupt,
}

impl PollMode {
    fn parse(s: &str) -> Option<PollMode> {
        match s {
            "busy" => Some(PollMode::Busy),
            "adaptive" => Some(PollMode::Adaptive),
            "interrupt" => Some(PollMode::Interrupt),
            _ => None,
        }
    }
}

/// When a READ or WRITE may have its data in several buffers of a smaller
/// class (a scatter-gather buffer) instead of one (`--buffer-sg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferSg {
    /// Only when the one-buffer class has nothing free: the command runs
    /// now on idle smaller buffers rather than wait.
    Fallback,
    /// Whenever smaller buffers can hold it (testing the path; costs a
    /// little per command).
    Always,
    /// Never: a command waits for a buffer of its class.
    Off,
}

impl BufferSg {
    fn parse(s: &str) -> Option<BufferSg> {
        match s {
            "fallback" => Some(BufferSg::Fallback),
            "always" => Some(BufferSg::Always),
            "off" => Some(BufferSg::Off),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortalConfig {
    pub addr: SocketAddr,
    pub transport: Transport,
    pub tpgt: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// Lowercase iqn./eui./naa. name.
    pub name: String,
    pub alias: Option<String>,
    /// Non-empty, LUN numbers unique.
    pub luns: Vec<LunConfig>,
    /// Initiator names allowed to log in; empty: anyone.
    pub allow: Vec<String>,
    /// Credentials initiators must present (one-way CHAP).
    pub chap: Option<ChapPair>,
    /// The target's own credentials for mutual CHAP; only with `chap`.
    pub mutual_chap: Option<ChapPair>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct ChapPair {
    pub user: String,
    pub secret: String,
}

impl fmt::Debug for ChapPair {
    // Keep secrets out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChapPair")
            .field("user", &self.user)
            .field("secret", &"<hidden>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LunConfig {
    pub lun: u64,
    pub backstore: BackstoreSpec,
    /// 512 or 4096.
    pub block_size: u32,
    pub read_only: bool,
    /// Removable medium: PREVENT ALLOW MEDIUM REMOVAL, eject and load.
    pub removable: bool,
    /// WCE at start-up (where the backstore has a volatile cache); false:
    /// every write durable before GOOD until an initiator turns it on.
    pub write_cache: bool,
    /// Unit serial number (VPD 0x80); `None`: the engine makes one.
    pub serial: Option<String>,
}

/// Sizes are in bytes, non-zero and a multiple of the LUN's block size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackstoreSpec {
    Mem {
        size: u64,
    },
    Null {
        size: u64,
    },
    /// `size: None`: use the file's (or block device's) current size.
    File {
        path: PathBuf,
        size: Option<u64>,
        /// O_DIRECT: bypass the page cache.
        direct: bool,
    },
    /// An image file on a Gluster volume, through libgfapi. `url.size` is
    /// always `None`; the parsed size is `size` (`None`: the file's).
    Gluster {
        url: GlusterUrl,
        size: Option<u64>,
    },
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub enum ConfigError {
    /// Usage error, or `--help` / `--version` (clap renders the text).
    Cli(clap::Error),
    /// `--example-config`: not a failure; `Display` is the example TOML.
    ExampleRequested,
    /// The config file could not be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML, has an unknown field or a value of
    /// the wrong type (the message has line and column).
    Parse { path: PathBuf, message: String },
    /// A value was refused. `at` says where it came from, e.g.
    /// `--lun "foo:1G"` or `config /etc/x.toml: targets[0].luns[1].size`.
    Invalid { at: String, reason: String },
}

impl ConfigError {
    fn invalid(at: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: at.into(),
            reason: reason.into(),
        }
    }

    /// Process exit code: 0 for `--help`, `--version`, `--example-config`;
    /// 2 for everything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Cli(e) => e.exit_code(),
            ConfigError::ExampleRequested => 0,
            _ => 2,
        }
    }

    /// Whether the text belongs on stdout (help, version, example) rather
    /// than stderr.
    pub fn is_informational(&self) -> bool {
        self.exit_code() == 0
    }

    /// Print the message where it belongs and exit the process.
    pub fn exit(&self) -> ! {
        match self {
            ConfigError::Cli(e) => e.exit(),
            ConfigError::ExampleRequested => {
                let _ = std::io::stdout()
                    .lock()
                    .write_all(example_toml().as_bytes());
            }
            _ => {
                let _ = writeln!(std::io::stderr().lock(), "target-rdma: {self}");
            }
        }
        std::process::exit(self.exit_code())
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Cli(e) => write!(f, "{e}"),
            ConfigError::ExampleRequested => f.write_str(example_toml()),
            ConfigError::Read { path, source } => {
                write!(f, "config {}: cannot read: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(f, "config {}: {}", path.display(), message.trim_end())
            }
            ConfigError::Invalid { at, reason } => write!(f, "{at}: {reason}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Cli(e) => Some(e),
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const AFTER_HELP: &str = "\
LUN specs (--lun, repeatable; LUNs are numbered 0, 1, 2... in the order given):
  mem:SIZE[,block=512|4096][,ro][,removable][,serial=TEXT]    RAM disk, lost at exit
  null:SIZE[,block=512|4096][,ro][,removable][,serial=TEXT]   reads zeros, discards writes
  file:PATH[,size=SIZE][,block=512|4096][,ro][,removable][,serial=TEXT][,direct]
       [,write_cache=on|off]
                                                  file or block device; without
                                                  size=, the file's own size;
                                                  direct: O_DIRECT, no page cache;
                                                  write_cache=off: every write
                                                  durable before GOOD (WCE=0)
  gluster://HOST[:PORT][,HOST2[:PORT]...]/VOLUME/PATH[?size=SIZE]
                                                  image file on a Gluster volume
                                                  (libgfapi), created at size= if
                                                  missing; without size=, the
                                                  file's own size (LUN options
                                                  for these: --config)
  Sizes are binary multiples: 4096, 4k, 4KiB, 64M, 64MiB, 1G, 1GiB, 1T, 1TiB.
  Default block size 512. PATH cannot contain ',' (use --config for that).

Names (--target, --allow) are iSCSI names in lowercase: iqn.YYYY-MM.reversed.domain[:text],
eui. + 16 hex digits, or naa. + 16 or 32 hex digits.

CHAP secrets are 12 to 255 bytes (RFC 7143 9.2.1 asks for at least 96 bits).
USER cannot contain ':' on the command line. Secrets on the command line are
visible to other local users (ps); prefer --config for real deployments.

With --config, settings flags override the file, --portal replaces the file's
portals, and target flags (--target, --alias, --lun, --allow, --chap,
--mutual-chap) apply to the file's target named by --target (a new target if
there is none of that name) or to the file's only target: --lun and --allow
add, the others replace.

Examples:
  target-rdma                      1 GiB RAM LUN on 127.0.0.1:3260, anyone may log in
  target-rdma --portal 0.0.0.0:3260 --lun file:/srv/disk.img \\
              --allow iqn.1994-05.com.redhat:client1 --chap user1:secret123456
  target-rdma --config /etc/target-rdma.toml --log-level debug
  target-rdma --example-config > target-rdma.toml";

#[derive(Parser, Debug, Default)]
#[command(
    name = "target-rdma",
    version,
    about = "User-space iSCSI/iSER block storage target",
    long_about = "User-space iSCSI/iSER block storage target.\n\n\
                  With no arguments, serves a 1 GiB RAM LUN (mem:1GiB) as target \
                  iqn.2026-11.io.target-rdma:default on 127.0.0.1:3260.",
    bin_name = "target-rdma",
    after_help = "See --help for LUN specs, name and CHAP rules, and how flags combine with --config.",
    after_long_help = AFTER_HELP
)]
struct Cli {
    /// Read targets, portals and settings from this TOML file (see --example-config)
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Print a commented example config file and exit
    #[arg(long)]
    example_config: bool,

    /// Listen on ADDR:PORT, IPv4 or [IPv6]; ",iser" selects iSER, ",tcp" (default) TCP.
    /// Repeatable [default: 127.0.0.1:3260]
    #[arg(long, value_name = "ADDR:PORT[,tcp|,iser]")]
    portal: Vec<String>,

    /// Target name [default: iqn.2026-11.io.target-rdma:default]
    #[arg(long, value_name = "IQN")]
    target: Option<String>,

    /// Target alias (TargetAlias) shown to initiators
    #[arg(long, value_name = "TEXT")]
    alias: Option<String>,

    /// Add a LUN (see "LUN specs" below). Repeatable [default: mem:1GiB]
    #[arg(long, value_name = "SPEC")]
    lun: Vec<String>,

    /// Require initiators to authenticate with CHAP as USER with SECRET
    #[arg(long, value_name = "USER:SECRET")]
    chap: Option<String>,

    /// The target's own credentials for mutual CHAP (needs --chap)
    #[arg(long, value_name = "USER:SECRET")]
    mutual_chap: Option<String>,

    /// Let only this initiator name log in. Repeatable; none: anyone may
    #[arg(long, value_name = "INITIATOR-IQN")]
    allow: Vec<String>,

    /// Require CHAP for discovery sessions
    #[arg(long, value_name = "USER:SECRET")]
    discovery_chap: Option<String>,

    /// Log level [default: info]
    #[arg(long, value_name = "LEVEL", value_parser = LOG_LEVELS)]
    log_level: Option<String>,

    /// One pinned reactor per CPU listed, e.g. 0-7 or 0,2,4-7 [default: every CPU the process may use]
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,

    /// Commands each session may have outstanding, 1..=4096 [default: 128]
    #[arg(long, value_name = "N")]
    queue_depth: Option<u32>,

    /// MiB of (huge page) memory for command data buffers, mapped and
    /// locked at start-up, 64..=65536 [default: 256]
    #[arg(long, value_name = "MIB")]
    buffer_pool_mib: Option<u32>,

    /// When a READ or WRITE may take several smaller buffers:
    /// fallback (when its own class has none free), always, off
    /// [default: fallback]
    #[arg(long, value_name = "WHEN", value_parser = ["fallback", "always", "off"])]
    buffer_sg: Option<String>,

    /// Most sessions at once, 1..=65535 [default: 64]
    #[arg(long, value_name = "N")]
    max_sessions: Option<u32>,

    /// Directory for persistent reservation (APTPL) state
    /// [default: /var/lib/target-rdma, else $XDG_STATE_HOME/target-rdma or
    /// ~/.local/state/target-rdma when /var/lib is not writable]
    #[arg(long, value_name = "DIR")]
    pr_dir: Option<PathBuf>,

    /// Ping an idle initiator with NOP-In after this many seconds; 0: never [default: 30]
    #[arg(long, value_name = "SECONDS")]
    nop_interval_s: Option<u32>,

    /// Drop the connection when a NOP-In ping is not answered within this many
    /// seconds [default: 30]
    #[arg(long, value_name = "SECONDS")]
    nop_timeout_s: Option<u32>,

    /// How reactors wait for work: busy (always spin), adaptive (spin while
    /// commands come one at a time, else sleep), interrupt (always sleep)
    /// [default: adaptive; interrupt when a LUN is on Gluster]
    #[arg(long, value_name = "MODE", value_parser = ["busy", "adaptive", "interrupt"])]
    poll: Option<String>,

    /// Adaptive polling: pause this many microseconds between batches of
    /// commands, so one socket read and one write serve many, while the
    /// reactor measures that this saves CPU per command; 0: never,
    /// 0..=1000 [default: 80]
    #[arg(long, value_name = "US")]
    poll_coalesce_us: Option<u32>,

    /// Write per-core and per-LUN counters to this file as JSON, replaced
    /// atomically every second [default: none]
    #[arg(long, value_name = "FILE")]
    stats_file: Option<PathBuf>,

    /// Gluster LUNs: fail an operation (with sense data initiators retry)
    /// that gluster has not finished within this many seconds, 2..=3600;
    /// gluster's ping-timeout is set to half of it [default: 20]
    #[arg(long, value_name = "SECONDS")]
    command_timeout_s: Option<u32>,

    /// Where libgfapi writes its log [default: standard error]
    #[arg(long, value_name = "FILE")]
    gluster_log_file: Option<PathBuf>,
}

impl Cli {
    fn has_target_flags(&self) -> bool {
        self.target.is_some()
            || self.alias.is_some()
            || !self.lun.is_empty()
            || !self.allow.is_empty()
            || self.chap.is_some()
            || self.mutual_chap.is_some()
    }

    /// The first target flag given, to point at in errors.
    fn first_target_flag(&self) -> String {
        if let Some(l) = self.lun.first() {
            flag_at("--lun", l)
        } else if let Some(a) = self.allow.first() {
            flag_at("--allow", a)
        } else if let Some(a) = &self.alias {
            flag_at("--alias", a)
        } else if self.chap.is_some() {
            "--chap".to_string()
        } else {
            "--mutual-chap".to_string()
        }
    }
}

fn flag_at(flag: &str, value: &str) -> String {
    format!("{flag} {value:?}")
}

// ---------------------------------------------------------------------------
// Config file
// ---------------------------------------------------------------------------

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    log_level: Option<String>,
    cores: Option<toml::Value>,
    queue_depth: Option<i64>,
    buffer_pool_mib: Option<i64>,
    buffer_sg: Option<String>,
    max_sessions: Option<i64>,
    pr_dir: Option<PathBuf>,
    nop_interval_s: Option<i64>,
    nop_timeout_s: Option<i64>,
    poll: Option<String>,
    poll_coalesce_us: Option<i64>,
    stats_file: Option<PathBuf>,
    command_timeout_s: Option<i64>,
    gluster_log_file: Option<PathBuf>,
    discovery_chap: Option<FileChap>,
    #[serde(default)]
    portals: Vec<FilePortal>,
    #[serde(default)]
    targets: Vec<FileTarget>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FilePortal {
    addr: String,
    transport: Option<String>,
    tpgt: Option<i64>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    name: String,
    alias: Option<String>,
    #[serde(default)]
    luns: Vec<FileLun>,
    #[serde(default)]
    allow: Vec<String>,
    chap: Option<FileChap>,
    mutual_chap: Option<FileChap>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileLun {
    lun: Option<i64>,
    backstore: String,
    size: Option<toml::Value>,
    path: Option<PathBuf>,
    block_size: Option<i64>,
    read_only: Option<bool>,
    removable: Option<bool>,
    write_cache: Option<bool>,
    serial: Option<String>,
    direct: Option<bool>,
    url: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct FileChap {
    user: String,
    secret: String,
}

/// A commented example config file; it parses and validates (tested).
pub fn example_toml() -> &'static str {
    EXAMPLE_TOML
}

const EXAMPLE_TOML: &str = r#"# target-rdma example configuration (TOML).
# Every field is optional unless marked "required"; unknown fields are errors.
# Command-line flags given together with --config override these settings.

# error, warn, info, debug or trace.
log_level = "info"
# One pinned reactor per CPU listed: "0-7", "0,2,4-7" or [0, 1, 2, 3].
# Leave out for one reactor on every CPU the process may use.
cores = "0-1"
# Commands each session may have outstanding (1..=4096).
queue_depth = 128
# MiB of memory for command data buffers (64..=65536), on 2 MiB huge pages
# when reserved (vm.nr_hugepages), else transparent huge pages; a command
# finding none free waits for one.
buffer_pool_mib = 256
# When a READ or WRITE may have its data in several smaller
# buffers: "fallback" (default: when its own size has none free), "always"
# or "off".
buffer_sg = "fallback"
# Most sessions at once (1..=65535).
max_sessions = 64
# Persistent reservation (APTPL) state; relative paths are relative to
# this file's directory.
pr_dir = "/var/lib/target-rdma"
# Ping idle initiators with NOP-In after this many seconds (0: never), and
# drop the connection if the answer takes longer than nop_timeout_s.
nop_interval_s = 30
nop_timeout_s = 30
# How reactors wait for work: "busy", "adaptive" (default) or "interrupt".
poll = "adaptive"
# Adaptive polling: when small commands (4 KiB writes) arrive one per socket
# read, pause this many microseconds between batches (0: never; 0..=1000).
poll_coalesce_us = 80
# Per-core and per-LUN counters as JSON, rewritten every second (default:
# none); relative paths are relative to this file's directory.
stats_file = "/run/target-rdma/stats.json"
# Gluster LUNs: an operation gluster has not finished within this many
# seconds fails with sense data initiators retry (2..=3600, default 20);
# gluster's client ping-timeout is set to half of it. Keep it below the
# initiators' command timeout (30 s on Linux).
command_timeout_s = 20
# Where libgfapi logs (default: standard error).
gluster_log_file = "/var/log/target-rdma/gfapi.log"

# CHAP for discovery (SendTargets) sessions. Secrets are 12..=255 bytes.
[discovery_chap]
user = "discovery"
secret = "discovery-secret-1"

# Where to listen; every target is offered on every portal.
# Default when there is none: 127.0.0.1:3260 over TCP.
[[portals]]
addr = "0.0.0.0:3260"       # required; IPv4 or [IPv6], port defaults to 3260
transport = "tcp"           # "tcp" (default) or "iser"
tpgt = 1                    # target portal group tag (default 1)

[[portals]]
addr = "[::]:3260"

[[targets]]
name = "iqn.2026-11.io.example:fast"    # required: iqn./eui./naa. name, lowercase
alias = "fast scratch disks"
# Initiators allowed to log in; leave out (or empty) to allow anyone.
allow = ["iqn.1994-05.com.redhat:client1", "iqn.1991-05.com.microsoft:host2"]
# Initiators must log in with these credentials (one-way CHAP) ...
chap = { user = "client", secret = "client-secret-1" }
# ... and the target answers with these (mutual CHAP; needs chap, and the
# two secrets must differ).
mutual_chap = { user = "target", secret = "target-secret-1" }

# LUNs are numbered 0, 1, 2... in order unless "lun" says otherwise.
[[targets.luns]]
backstore = "mem"       # required: "mem", "null", "file" or "gluster"
size = "4GiB"           # required for mem and null: 4096, 4k, 64MiB, 1GiB, 1TiB...
block_size = 4096       # 512 (default) or 4096

[[targets.luns]]
backstore = "null"
size = "1TiB"
read_only = false       # default false
removable = false       # default false; true: the initiator may eject and load the medium
write_cache = true      # default true (WCE=1) where writes can sit in a volatile cache (file,
                        # gluster); false: every write durable before GOOD until an
                        # initiator turns the cache on (MODE SELECT)
serial = "NULL0001"     # unit serial number (VPD 0x80); made up when left out

[[targets]]
name = "iqn.2026-11.io.example:storage"

[[targets.luns]]
lun = 0
backstore = "file"
path = "/srv/target-rdma/disk0.img"   # required for file; a file or block device
# size = "100GiB"   # leave out to use the file's own size
direct = false      # file only; true: O_DIRECT, bypassing the page cache (the
                    # filesystem must support it; block_size a multiple of its
                    # direct I/O alignment)

[[targets.luns]]
lun = 5
backstore = "file"
path = "/srv/target-rdma/iso.img"
read_only = true

[[targets.luns]]
backstore = "gluster"
# required for gluster: servers (port 24007 by default), volume, image path;
# one connection is shared by all LUNs on the same volume and servers.
url = "gluster://gluster1.example,gluster2.example:24007/vol0/luns/disk1.img"
size = "100GiB"     # or ?size= in the url; created at this size if missing,
                    # leave out to use the file's own size
block_size = 4096
"#;

// ---------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------

/// Parse the command line (`args` includes the program name, as
/// `std::env::args_os()` does), read `--config` if given, merge and validate.
///
/// `--help`, `--version` and `--example-config` come back as errors whose
/// [`ConfigError::exit_code`] is 0; [`ConfigError::exit`] prints any error
/// where it belongs and exits.
pub fn load<I, T>(args: I) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    load_with_cpus(args, affinity_cpus().as_deref())
}

/// `load`, checking `--cores` (or `cores`) against `allowed_cpus` (the
/// affinity mask; `None`: unknown, not checked).
pub fn load_with_cpus<I, T>(args: I, allowed_cpus: Option<&[usize]>) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(args).map_err(ConfigError::Cli)?;
    if cli.example_config {
        return Err(ConfigError::ExampleRequested);
    }
    let file = match &cli.config {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            Some((path.clone(), parse_file(path, &text)?))
        }
    };
    let cfg = build(&cli, file.as_ref().map(|(p, f)| (p.as_path(), f)))?;
    if let (Some(cores), Some(allowed)) = (&cfg.cores, allowed_cpus) {
        let at = match &file {
            Some((path, _)) if cli.cores.is_none() => format!("config {}: cores", path.display()),
            _ => "--cores".to_string(),
        };
        check_cores_allowed(cores, allowed).map_err(|r| ConfigError::invalid(at, r))?;
    }
    Ok(cfg)
}

/// The CPUs this process may run on (its affinity mask, as `taskset` or a
/// cgroup's cpuset set it); `None` when it cannot be read.
pub fn affinity_cpus() -> Option<Vec<usize>> {
    core_affinity::get_core_ids().map(|ids| ids.into_iter().map(|c| c.id).collect())
}

/// A reactor pinned to a CPU outside the affinity mask would not run there
/// (the pin fails) and would share a CPU with another reactor: refuse the
/// list rather than start more reactors than there are CPUs to run them.
pub fn check_cores_allowed(cores: &[usize], allowed: &[usize]) -> Result<(), String> {
    match cores.iter().find(|c| !allowed.contains(c)) {
        None => Ok(()),
        Some(c) => Err(format!(
            "CPU {c} is not one this process may run on (allowed: {})",
            cpu_list(allowed)
        )),
    }
}

/// `0-3,6`: a CPU list in the form `--cores` takes.
fn cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            sorted[i].to_string()
        } else {
            format!("{}-{}", sorted[i], sorted[j])
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(",")
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A target being assembled, with where its parts came from for errors.
struct TargetDraft {
    cfg: TargetConfig,
    at: String,
    luns_at: String,
    mutual_at: String,
    chap_secret_at: String,
}

fn build(cli: &Cli, file: Option<(&Path, &FileConfig)>) -> Result<Config, ConfigError> {
    let empty = FileConfig::default();
    let (path, fc) = match file {
        Some((p, f)) => (Some(p), f),
        None => (None, &empty),
    };
    let prefix = path.map(|p| format!("config {}", p.display()));
    let fat = |field: &str| format!("{}: {field}", prefix.as_deref().unwrap_or("config"));
    let base_dir = path.and_then(|p| p.parent()).unwrap_or(Path::new(""));

    // Settings: flag, else file, else default.
    let log_level = match (&cli.log_level, &fc.log_level) {
        (Some(l), _) => l.clone(),
        (None, Some(l)) => {
            check_log_level(l).map_err(|r| ConfigError::invalid(fat("log_level"), r))?
        }
        (None, None) => DEFAULT_LOG_LEVEL.to_string(),
    };
    let cores = match (&cli.cores, &fc.cores) {
        (Some(c), _) => {
            Some(parse_cores(c).map_err(|r| ConfigError::invalid(flag_at("--cores", c), r))?)
        }
        (None, Some(v)) => {
            Some(cores_from_toml(v).map_err(|r| ConfigError::invalid(fat("cores"), r))?)
        }
        (None, None) => None,
    };
    let num = |flag: &str,
               flag_v: Option<u32>,
               field: &str,
               file_v: Option<i64>,
               lo: u32,
               hi: u32,
               default: u32|
     -> Result<u32, ConfigError> {
        match (flag_v, file_v) {
            (Some(v), _) => check_range(i64::from(v), lo, hi)
                .map_err(|r| ConfigError::invalid(flag_at(flag, &v.to_string()), r)),
            (None, Some(v)) => {
                check_range(v, lo, hi).map_err(|r| ConfigError::invalid(fat(field), r))
            }
            (None, None) => Ok(default),
        }
    };
    let queue_depth = num(
        "--queue-depth",
        cli.queue_depth,
        "queue_depth",
        fc.queue_depth,
        1,
        MAX_QUEUE_DEPTH,
        DEFAULT_QUEUE_DEPTH,
    )?;
    let buffer_pool_mib = num(
        "--buffer-pool-mib",
        cli.buffer_pool_mib,
        "buffer_pool_mib",
        fc.buffer_pool_mib,
        64,
        65536,
        (crate::engine::DATA_POOL_BYTES >> 20) as u32,
    )?;
    let max_sessions = num(
        "--max-sessions",
        cli.max_sessions,
        "max_sessions",
        fc.max_sessions,
        1,
        MAX_MAX_SESSIONS,
        DEFAULT_MAX_SESSIONS,
    )?;
    let nop_interval_s = num(
        "--nop-interval-s",
        cli.nop_interval_s,
        "nop_interval_s",
        fc.nop_interval_s,
        0,
        MAX_NOP_S,
        DEFAULT_NOP_INTERVAL_S,
    )?;
    let poll_coalesce_us = num(
        "--poll-coalesce-us",
        cli.poll_coalesce_us,
        "poll_coalesce_us",
        fc.poll_coalesce_us,
        0,
        MAX_POLL_COALESCE_US,
        DEFAULT_POLL_COALESCE_US,
    )?;
    let nop_timeout_s = num(
        "--nop-timeout-s",
        cli.nop_timeout_s,
        "nop_timeout_s",
        fc.nop_timeout_s,
        1,
        MAX_NOP_S,
        DEFAULT_NOP_TIMEOUT_S,
    )?;
    let command_timeout_s = num(
        "--command-timeout-s",
        cli.command_timeout_s,
        "command_timeout_s",
        fc.command_timeout_s,
        MIN_COMMAND_TIMEOUT_S,
        MAX_COMMAND_TIMEOUT_S,
        DEFAULT_COMMAND_TIMEOUT_S,
    )?;
    let gluster_log_file = match (&cli.gluster_log_file, &fc.gluster_log_file) {
        (Some(f), _) if f.as_os_str().is_empty() => {
            return Err(ConfigError::invalid("--gluster-log-file", "is empty"))
        }
        (Some(f), _) => Some(f.clone()),
        (None, Some(f)) if f.as_os_str().is_empty() => {
            return Err(ConfigError::invalid(fat("gluster_log_file"), "is empty"))
        }
        (None, Some(f)) => Some(base_dir.join(f)),
        (None, None) => None,
    };
    let buffer_sg = match (&cli.buffer_sg, &fc.buffer_sg) {
        (Some(p), _) => BufferSg::parse(p).ok_or_else(|| {
            ConfigError::invalid(
                flag_at("--buffer-sg", p),
                "expected fallback, always or off".to_string(),
            )
        })?,
        (None, Some(p)) => BufferSg::parse(p).ok_or_else(|| {
            ConfigError::invalid(
                fat("buffer_sg"),
                format!("{p:?} is not a buffer_sg setting (expected fallback, always or off)"),
            )
        })?,
        (None, None) => BufferSg::Fallback,
    };
    let poll_given = match (&cli.poll, &fc.poll) {
        (Some(p), _) => Some(PollMode::parse(p).ok_or_else(|| {
            ConfigError::invalid(
                flag_at("--poll", p),
                "expected busy, adaptive or interrupt".to_string(),
            )
        })?),
        (None, Some(p)) => Some(PollMode::parse(p).ok_or_else(|| {
            ConfigError::invalid(
                fat("poll"),
                format!("{p:?} is not a poll mode (expected busy, adaptive or interrupt)"),
            )
        })?),
        (None, None) => None,
    };
    let pr_dir = match (&cli.pr_dir, &fc.pr_dir) {
        (Some(d), _) => {
            check_dir(d).map_err(|r| {
                ConfigError::invalid(flag_at("--pr-dir", &d.display().to_string()), r)
            })?;
            d.clone()
        }
        (None, Some(d)) => {
            check_dir(d).map_err(|r| ConfigError::invalid(fat("pr_dir"), r))?;
            base_dir.join(d)
        }
        (None, None) => default_pr_dir(),
    };
    let stats_file = match (&cli.stats_file, &fc.stats_file) {
        (Some(f), _) => Some(check_stats_file(f).map_err(|r| {
            ConfigError::invalid(flag_at("--stats-file", &f.display().to_string()), r)
        })?),
        (None, Some(f)) => Some(
            base_dir
                .join(check_stats_file(f).map_err(|r| ConfigError::invalid(fat("stats_file"), r))?),
        ),
        (None, None) => None,
    };
    let discovery_chap = match (&cli.discovery_chap, &fc.discovery_chap) {
        (Some(c), _) => Some(chap_from_flag("--discovery-chap", c)?),
        (None, Some(c)) => Some(chap_from_file(c, &fat("discovery_chap"))?),
        (None, None) => None,
    };

    // Portals: flags replace the file's list.
    let mut portals: Vec<(PortalConfig, String)> = Vec::new();
    if !cli.portal.is_empty() {
        for p in &cli.portal {
            let at = flag_at("--portal", p);
            let pc = parse_portal_flag(p).map_err(|r| ConfigError::invalid(&at, r))?;
            portals.push((pc, at));
        }
    } else {
        for (i, p) in fc.portals.iter().enumerate() {
            let pat = |f: &str| fat(&format!("portals[{i}].{f}"));
            let addr = parse_addr(&p.addr).map_err(|r| ConfigError::invalid(pat("addr"), r))?;
            let transport = match &p.transport {
                None => Transport::Tcp,
                Some(t) => {
                    parse_transport(t).map_err(|r| ConfigError::invalid(pat("transport"), r))?
                }
            };
            let tpgt = match p.tpgt {
                None => DEFAULT_TPGT,
                Some(t) => u16::try_from(t).map_err(|_| {
                    ConfigError::invalid(
                        pat("tpgt"),
                        format!("{t} is out of range (expected 0..=65535)"),
                    )
                })?,
            };
            portals.push((
                PortalConfig {
                    addr,
                    transport,
                    tpgt,
                },
                fat(&format!("portals[{i}]")),
            ));
        }
    }
    if portals.is_empty() {
        portals.push((
            PortalConfig {
                addr: DEFAULT_PORTAL,
                transport: Transport::Tcp,
                tpgt: DEFAULT_TPGT,
            },
            "default portal".to_string(),
        ));
    }
    for (i, (p, at)) in portals.iter().enumerate() {
        for (q, _) in &portals[..i] {
            if let Some(why) = portal_clash(p, q) {
                return Err(ConfigError::invalid(at, why));
            }
        }
    }

    // Targets from the file.
    let mut drafts: Vec<TargetDraft> = Vec::new();
    for (t, ft) in fc.targets.iter().enumerate() {
        let d = target_from_file(ft, t, &fat, base_dir)?;
        if let Some(prev) = drafts.iter().find(|p| p.cfg.name == d.cfg.name) {
            return Err(ConfigError::invalid(
                fat(&format!("targets[{t}].name")),
                format!("target {:?} is already defined at {}", d.cfg.name, prev.at),
            ));
        }
        drafts.push(d);
    }

    // Target flags.
    if cli.has_target_flags() {
        let idx = match &cli.target {
            Some(name) => {
                let at = flag_at("--target", name);
                check_iscsi_name(name).map_err(|r| ConfigError::invalid(&at, r))?;
                match drafts.iter().position(|d| &d.cfg.name == name) {
                    Some(i) => i,
                    None => {
                        drafts.push(flag_target(name, at));
                        drafts.len() - 1
                    }
                }
            }
            None => match drafts.len() {
                0 => {
                    drafts.push(flag_target(DEFAULT_TARGET_NAME, "default target".into()));
                    0
                }
                1 => 0,
                n => {
                    return Err(ConfigError::invalid(
                        cli.first_target_flag(),
                        format!(
                            "the config file defines {n} targets; add --target IQN to say which \
                             one this applies to (or to add a new target)"
                        ),
                    ))
                }
            },
        };
        let made_from_flags = idx >= fc.targets.len();
        let d = &mut drafts[idx];
        apply_target_flags(cli, d)?;
        if made_from_flags && d.cfg.luns.is_empty() {
            d.cfg.luns.push(default_lun());
        }
    } else if drafts.is_empty() {
        let mut d = flag_target(DEFAULT_TARGET_NAME, "default target".into());
        d.cfg.luns.push(default_lun());
        drafts.push(d);
    }

    // Whole-target checks.
    for d in &drafts {
        if d.cfg.luns.is_empty() {
            return Err(ConfigError::invalid(
                &d.luns_at,
                "a target needs at least one LUN",
            ));
        }
        if let Some(m) = &d.cfg.mutual_chap {
            match &d.cfg.chap {
                None => {
                    return Err(ConfigError::invalid(
                        &d.mutual_at,
                        "mutual CHAP needs one-way CHAP too (add chap / --chap)",
                    ))
                }
                Some(c) if c.secret == m.secret => {
                    return Err(ConfigError::invalid(
                        &d.mutual_at,
                        format!(
                            "the target's secret must differ from the initiator's CHAP secret \
                             (given at {}; RFC 7143 9.2.1)",
                            d.chap_secret_at
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
    }

    // Unless told otherwise, a target with Gluster LUNs does not spin:
    // libgfapi does its work on its own threads, which a spinning reactor
    // starves on a machine with few cores (measured: 0.72-0.90 of direct
    // gfapi's IOPS at QD32 spinning, 0.99-1.27 sleeping, benches/README.md).
    let poll = poll_given.unwrap_or_else(|| {
        let gluster = drafts.iter().any(|d| {
            d.cfg
                .luns
                .iter()
                .any(|l| matches!(l.backstore, BackstoreSpec::Gluster { .. }))
        });
        if gluster {
            PollMode::Interrupt
        } else {
            PollMode::Adaptive
        }
    });
    Ok(Config {
        targets: drafts.into_iter().map(|d| d.cfg).collect(),
        portals: portals.into_iter().map(|(p, _)| p).collect(),
        log_level,
        cores,
        queue_depth,
        buffer_pool_mib,
        buffer_sg,
        max_sessions,
        pr_dir,
        nop_interval_s,
        nop_timeout_s,
        discovery_chap,
        poll,
        poll_coalesce_us,
        stats_file,
        command_timeout_s,
        gluster_log_file,
    })
}

/// A stats file path must name a file (it is replaced by renaming a
/// sibling temporary file, so its directory must exist).
fn check_stats_file(f: &Path) -> Result<PathBuf, String> {
    if f.as_os_str().is_empty() {
        return Err("is empty".into());
    }
    if f.file_name().is_none() || f.is_dir() {
        return Err("is a directory, not a file".into());
    }
    Ok(f.to_path_buf())
}

fn default_lun() -> LunConfig {
    LunConfig {
        lun: 0,
        backstore: BackstoreSpec::Mem { size: 1 << 30 },
        block_size: DEFAULT_BLOCK_SIZE,
        read_only: false,
        removable: false,
        write_cache: true,
        serial: None,
    }
}

fn flag_target(name: &str, at: String) -> TargetDraft {
    TargetDraft {
        cfg: TargetConfig {
            name: name.to_string(),
            alias: None,
            luns: Vec::new(),
            allow: Vec::new(),
            chap: None,
            mutual_chap: None,
        },
        luns_at: at.clone(),
        mutual_at: "--mutual-chap".into(),
        chap_secret_at: "--chap".into(),
        at,
    }
}

fn apply_target_flags(cli: &Cli, d: &mut TargetDraft) -> Result<(), ConfigError> {
    if let Some(a) = &cli.alias {
        check_alias(a).map_err(|r| ConfigError::invalid(flag_at("--alias", a), r))?;
        d.cfg.alias = Some(a.clone());
    }
    let first = d.cfg.luns.iter().map(|l| l.lun + 1).max().unwrap_or(0);
    for (next, spec) in (first..).zip(&cli.lun) {
        let at = flag_at("--lun", spec);
        if next > MAX_LUN {
            return Err(ConfigError::invalid(
                at,
                format!("no LUN number left (the highest is {MAX_LUN})"),
            ));
        }
        let mut lun = parse_lun_spec(spec).map_err(|r| ConfigError::invalid(&at, r))?;
        lun.lun = next;
        d.cfg.luns.push(lun);
    }
    for name in &cli.allow {
        let at = flag_at("--allow", name);
        check_iscsi_name(name).map_err(|r| ConfigError::invalid(&at, r))?;
        if d.cfg.allow.contains(name) {
            return Err(ConfigError::invalid(
                at,
                format!("{name:?} is already allowed for {}", d.at),
            ));
        }
        d.cfg.allow.push(name.clone());
    }
    if let Some(c) = &cli.chap {
        d.cfg.chap = Some(chap_from_flag("--chap", c)?);
        d.chap_secret_at = "--chap".into();
    }
    if let Some(c) = &cli.mutual_chap {
        d.cfg.mutual_chap = Some(chap_from_flag("--mutual-chap", c)?);
        d.mutual_at = "--mutual-chap".into();
    }
    Ok(())
}

fn target_from_file(
    ft: &FileTarget,
    t: usize,
    fat: &dyn Fn(&str) -> String,
    base_dir: &Path,
) -> Result<TargetDraft, ConfigError> {
    let tat = |f: &str| fat(&format!("targets[{t}].{f}"));
    check_iscsi_name(&ft.name).map_err(|r| ConfigError::invalid(tat("name"), r))?;
    if let Some(a) = &ft.alias {
        check_alias(a).map_err(|r| ConfigError::invalid(tat("alias"), r))?;
    }
    let mut allow: Vec<String> = Vec::new();
    for (i, name) in ft.allow.iter().enumerate() {
        let at = tat(&format!("allow[{i}]"));
        check_iscsi_name(name).map_err(|r| ConfigError::invalid(&at, r))?;
        if allow.contains(name) {
            return Err(ConfigError::invalid(
                at,
                format!("{name:?} is listed twice"),
            ));
        }
        allow.push(name.clone());
    }
    let chap = match &ft.chap {
        Some(c) => Some(chap_from_file(c, &tat("chap"))?),
        None => None,
    };
    let mutual_chap = match &ft.mutual_chap {
        Some(c) => Some(chap_from_file(c, &tat("mutual_chap"))?),
        None => None,
    };
    let mut luns: Vec<LunConfig> = Vec::new();
    let mut next = 0u64;
    for (l, fl) in ft.luns.iter().enumerate() {
        let lat = |f: &str| tat(&format!("luns[{l}].{f}"));
        let lun = lun_from_file(fl, &lat, base_dir, next)?;
        if let Some(j) = luns.iter().position(|x| x.lun == lun.lun) {
            return Err(ConfigError::invalid(
                lat("lun"),
                format!("LUN {} is already used by targets[{t}].luns[{j}]", lun.lun),
            ));
        }
        next = lun.lun + 1;
        luns.push(lun);
    }
    Ok(TargetDraft {
        cfg: TargetConfig {
            name: ft.name.clone(),
            alias: ft.alias.clone(),
            luns,
            allow,
            chap,
            mutual_chap,
        },
        at: fat(&format!("targets[{t}]")),
        luns_at: tat("luns"),
        mutual_at: tat("mutual_chap"),
        chap_secret_at: tat("chap.secret"),
    })
}

fn lun_from_file(
    fl: &FileLun,
    lat: &dyn Fn(&str) -> String,
    base_dir: &Path,
    next: u64,
) -> Result<LunConfig, ConfigError> {
    let lun = match fl.lun {
        None if next > MAX_LUN => {
            return Err(ConfigError::invalid(
                lat("lun"),
                format!("no LUN number left (the highest is {MAX_LUN})"),
            ))
        }
        None => next,
        Some(n) => u64::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_LUN)
            .ok_or_else(|| {
                ConfigError::invalid(
                    lat("lun"),
                    format!("{n} is out of range (expected 0..={MAX_LUN})"),
                )
            })?,
    };
    let block_size = match fl.block_size {
        None => DEFAULT_BLOCK_SIZE,
        Some(b) => check_block_size(&b.to_string())
            .map_err(|r| ConfigError::invalid(lat("block_size"), r))?,
    };
    let size = match &fl.size {
        None => None,
        Some(v) => Some(size_from_toml(v).map_err(|r| ConfigError::invalid(lat("size"), r))?),
    };
    if let Some(s) = size {
        check_multiple(s, block_size).map_err(|r| ConfigError::invalid(lat("size"), r))?;
    }
    let kind = fl.backstore.as_str();
    if kind != "gluster" && fl.url.is_some() {
        return Err(ConfigError::invalid(
            lat("url"),
            format!("only gluster LUNs have a url, not {kind}"),
        ));
    }
    let backstore = match kind {
        "gluster" => {
            if fl.path.is_some() {
                return Err(ConfigError::invalid(
                    lat("path"),
                    "gluster LUNs name their image with url, not path",
                ));
            }
            if fl.direct.is_some() {
                return Err(ConfigError::invalid(
                    lat("direct"),
                    "only file LUNs do direct I/O, not gluster",
                ));
            }
            let text = fl.url.as_ref().ok_or_else(|| {
                ConfigError::invalid(
                    lat("url"),
                    "missing: gluster LUNs need a url such as gluster://HOST/VOLUME/PATH",
                )
            })?;
            let (url, url_size) =
                gluster_url(text, block_size).map_err(|r| ConfigError::invalid(lat("url"), r))?;
            if url_size.is_some() && size.is_some() {
                return Err(ConfigError::invalid(
                    lat("size"),
                    "given twice: in url (?size=) and as size",
                ));
            }
            BackstoreSpec::Gluster {
                url,
                size: size.or(url_size),
            }
        }
        "mem" | "null" => {
            if fl.path.is_some() {
                return Err(ConfigError::invalid(
                    lat("path"),
                    format!("only file LUNs have a path, not {kind}"),
                ));
            }
            if fl.direct.is_some() {
                return Err(ConfigError::invalid(
                    lat("direct"),
                    format!("only file LUNs do direct I/O, not {kind}"),
                ));
            }
            let size = size.ok_or_else(|| {
                ConfigError::invalid(lat("size"), format!("missing: {kind} LUNs need a size"))
            })?;
            if kind == "mem" {
                BackstoreSpec::Mem { size }
            } else {
                BackstoreSpec::Null { size }
            }
        }
        "file" => {
            let path = fl.path.as_ref().ok_or_else(|| {
                ConfigError::invalid(lat("path"), "missing: file LUNs need a path")
            })?;
            if path.as_os_str().is_empty() {
                return Err(ConfigError::invalid(lat("path"), "is empty"));
            }
            BackstoreSpec::File {
                path: base_dir.join(path),
                size,
                direct: fl.direct.unwrap_or(false),
            }
        }
        other => {
            return Err(ConfigError::invalid(
                lat("backstore"),
                unknown_backstore(other),
            ))
        }
    };
    let serial = match &fl.serial {
        None => None,
        Some(s) => {
            check_serial(s).map_err(|r| ConfigError::invalid(lat("serial"), r))?;
            Some(s.clone())
        }
    };
    Ok(LunConfig {
        lun,
        backstore,
        block_size,
        read_only: fl.read_only.unwrap_or(false),
        removable: fl.removable.unwrap_or(false),
        write_cache: fl.write_cache.unwrap_or(true),
        serial,
    })
}

// ---------------------------------------------------------------------------
// Value parsers and checks (each returns the reason on failure)
// ---------------------------------------------------------------------------

/// Parse a size in bytes: a number with an optional binary suffix
/// (k/K/KiB, M/MiB, G/GiB, T/TiB, P/PiB, E/EiB, case-insensitive; B for
/// bytes). Zero and overflow are refused.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let bad = || format!("{text:?} is not a size ({SIZE_HINT})");
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return Err(bad());
    }
    let (digits, unit) = s.split_at(end);
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "p" | "pib" => 50,
        "e" | "eib" => 60,
        _ => return Err(bad()),
    };
    let too_big = || format!("{text:?} is too large (at most 2^64-1 bytes)");
    let n: u64 = digits.parse().map_err(|_| too_big())?;
    let bytes = n.checked_mul(1u64 << shift).ok_or_else(too_big)?;
    if bytes == 0 {
        return Err(format!("{text:?} is zero; a LUN needs at least one block"));
    }
    Ok(bytes)
}

fn size_from_toml(v: &toml::Value) -> Result<u64, String> {
    match v {
        toml::Value::String(s) => parse_size(s),
        toml::Value::Integer(0) => Err("0 is zero; a LUN needs at least one block".into()),
        toml::Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| format!("{n} is not a size ({SIZE_HINT})"))
        }
        other => Err(format!(
            "{other} is not a size (use a string such as \"64MiB\" or a number of bytes)"
        )),
    }
}

fn check_block_size(text: &str) -> Result<u32, String> {
    match text.trim() {
        "512" => Ok(512),
        "4096" | "4k" | "4K" | "4KiB" => Ok(4096),
        _ => Err(format!(
            "block size {text:?} is not supported (use 512 or 4096)"
        )),
    }
}

fn check_multiple(size: u64, block: u32) -> Result<(), String> {
    if !size.is_multiple_of(u64::from(block)) {
        Err(format!(
            "{size} bytes is not a multiple of the block size {block}"
        ))
    } else {
        Ok(())
    }
}

/// Parse a core list: `0-7`, `0,2,4-7`. Order is kept; duplicates refused.
pub fn parse_cores(text: &str) -> Result<Vec<usize>, String> {
    let bad = |why: String| {
        format!("{text:?} is not a core list ({why}; use forms such as 0-7 or 0,2,4-7)")
    };
    if text.trim().is_empty() {
        return Err(bad("it is empty".into()));
    }
    let num = |s: &str| -> Result<usize, String> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(format!("{s:?} is not a core number")));
        }
        match s.parse::<usize>() {
            Ok(n) if n <= MAX_CORE => Ok(n),
            _ => Err(bad(format!("core {s} is above {MAX_CORE}"))),
        }
    };
    let mut out = Vec::new();
    for part in text.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad(format!("range {} runs backwards", part.trim())));
        }
        for c in lo..=hi {
            if out.contains(&c) {
                return Err(bad(format!("core {c} is listed twice")));
            }
            out.push(c);
        }
    }
    Ok(out)
}

fn cores_from_toml(v: &toml::Value) -> Result<Vec<usize>, String> {
    match v {
        toml::Value::String(s) => parse_cores(s),
        toml::Value::Array(items) if !items.is_empty() => {
            let mut out = Vec::new();
            for item in items {
                let c = item
                    .as_integer()
                    .and_then(|n| usize::try_from(n).ok())
                    .filter(|&n| n <= MAX_CORE)
                    .ok_or_else(|| format!("{item} is not a core number (0..={MAX_CORE})"))?;
                if out.contains(&c) {
                    return Err(format!("core {c} is listed twice"));
                }
                out.push(c);
            }
            Ok(out)
        }
        other => Err(format!(
            "{other} is not a core list (use a string such as \"0-7\" or \"0,2,4-7\", or an array of core numbers)"
        )),
    }
}

fn check_log_level(l: &str) -> Result<String, String> {
    let lower = l.to_ascii_lowercase();
    if LOG_LEVELS.contains(&lower.as_str()) {
        Ok(lower)
    } else {
        Err(format!(
            "{l:?} is not a log level (expected {})",
            LOG_LEVELS.join(", ")
        ))
    }
}

fn check_range(v: i64, lo: u32, hi: u32) -> Result<u32, String> {
    u32::try_from(v)
        .ok()
        .filter(|n| (lo..=hi).contains(n))
        .ok_or_else(|| format!("{v} is out of range (expected {lo}..={hi})"))
}

fn check_dir(d: &Path) -> Result<(), String> {
    if d.as_os_str().is_empty() {
        Err("is empty".into())
    } else {
        Ok(())
    }
}

pub use iscsi::name::check_iscsi_name;

fn check_alias(a: &str) -> Result<(), String> {
    if a.is_empty() {
        Err("the alias is empty".into())
    } else if a.len() > 255 {
        Err(format!("the alias is {} bytes long; at most 255", a.len()))
    } else if a.chars().any(char::is_control) {
        Err("the alias contains control characters".into())
    } else {
        Ok(())
    }
}

fn check_serial(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        Err(format!(
            "{s:?} is not a serial number (1 to 64 printable ASCII characters, no spaces)"
        ))
    } else {
        Ok(())
    }
}

/// Which half of a CHAP pair is wrong, and why.
fn check_chap(user: &str, secret: &str) -> Result<(), (&'static str, String)> {
    if user.is_empty() {
        return Err(("user", "the CHAP user name is empty".into()));
    }
    if user.len() > 255 {
        return Err((
            "user",
            format!(
                "the CHAP user name is {} bytes long; at most 255",
                user.len()
            ),
        ));
    }
    if user.chars().any(char::is_control) {
        return Err((
            "user",
            "the CHAP user name contains control characters".into(),
        ));
    }
    if secret.len() < MIN_CHAP_SECRET {
        return Err((
            "secret",
            format!(
                "the CHAP secret is {} bytes; at least {MIN_CHAP_SECRET} are required \
                 (RFC 7143 9.2.1 asks for 96 bits; open-iscsi and libiscsi accept 12 and up)",
                secret.len()
            ),
        ));
    }
    if secret.len() > MAX_CHAP_SECRET {
        return Err((
            "secret",
            format!(
                "the CHAP secret is {} bytes; at most {MAX_CHAP_SECRET} are accepted",
                secret.len()
            ),
        ));
    }
    Ok(())
}

/// `USER:SECRET`; the user ends at the first ':'. Errors never echo the secret.
fn chap_from_flag(flag: &str, value: &str) -> Result<ChapPair, ConfigError> {
    let Some((user, secret)) = value.split_once(':') else {
        return Err(ConfigError::invalid(flag, "expected USER:SECRET"));
    };
    let at = format!("{flag} (user {user:?})");
    check_chap(user, secret).map_err(|(_, r)| ConfigError::invalid(at, r))?;
    Ok(ChapPair {
        user: user.to_string(),
        secret: secret.to_string(),
    })
}

fn chap_from_file(c: &FileChap, at: &str) -> Result<ChapPair, ConfigError> {
    check_chap(&c.user, &c.secret)
        .map_err(|(field, r)| ConfigError::invalid(format!("{at}.{field}"), r))?;
    Ok(ChapPair {
        user: c.user.clone(),
        secret: c.secret.clone(),
    })
}

fn parse_transport(t: &str) -> Result<Transport, String> {
    match t.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(Transport::Tcp),
        "iser" => Ok(Transport::Iser),
        _ => Err(format!("{t:?} is not a transport (expected tcp or iser)")),
    }
}

fn transport_name(t: Transport) -> &'static str {
    match t {
        Transport::Tcp => "tcp",
        Transport::Iser => "iser",
    }
}

/// `ADDR[:PORT]` with ADDR an IPv4 address or a bracketed IPv6 address
/// (a bare IPv6 address without port is accepted too). Port defaults to 3260.
fn parse_addr(text: &str) -> Result<SocketAddr, String> {
    let s = text.trim();
    let hint = "use IPv4 such as 0.0.0.0:3260 or IPv6 in brackets such as [::]:3260; host names are not resolved";
    let port_of = |p: Option<&str>| -> Result<u16, String> {
        match p {
            None => Ok(ISCSI_PORT),
            Some(p) => match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(format!("port {p:?} is not a number in 1..=65535")),
                Ok(n) => Ok(n),
            },
        }
    };
    if let Some(inner) = s.strip_prefix('[') {
        let Some((host, after)) = inner.split_once(']') else {
            return Err(format!("{text:?} has no closing ']' ({hint})"));
        };
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| format!("{host:?} is not an IPv6 address ({hint})"))?;
        let port = match after {
            "" => None,
            a => Some(
                a.strip_prefix(':')
                    .ok_or_else(|| format!("{text:?}: expected ':PORT' after ']' ({hint})"))?,
            ),
        };
        return Ok(SocketAddr::new(IpAddr::V6(ip), port_of(port)?));
    }
    if s.matches(':').count() > 1 {
        return match s.parse::<Ipv6Addr>() {
            Ok(ip) => Ok(SocketAddr::new(IpAddr::V6(ip), ISCSI_PORT)),
            Err(_) => Err(format!("{text:?} is not an address ({hint})")),
        };
    }
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    let ip: Ipv4Addr = host
        .parse()
        .map_err(|_| format!("{host:?} is not an IP address ({hint})"))?;
    Ok(SocketAddr::new(IpAddr::V4(ip), port_of(port)?))
}

/// `ADDR:PORT[,tcp|,iser]`.
fn parse_portal_flag(text: &str) -> Result<PortalConfig, String> {
    let mut parts = text.split(',');
    let addr = parse_addr(parts.next().unwrap_or(""))?;
    let transport = match parts.next() {
        None => Transport::Tcp,
        Some(t) => parse_transport(t)?,
    };
    if parts.next().is_some() {
        return Err("expected ADDR:PORT[,tcp|,iser]".into());
    }
    Ok(PortalConfig {
        addr,
        transport,
        tpgt: DEFAULT_TPGT,
    })
}

/// Why portal `p` cannot be listened on alongside the earlier `q`.
fn portal_clash(p: &PortalConfig, q: &PortalConfig) -> Option<String> {
    if p.transport != q.transport || p.addr.port() != q.addr.port() {
        return None;
    }
    let t = transport_name(p.transport);
    if p.addr == q.addr {
        return Some(format!("portal {} ({t}) is listed twice", p.addr));
    }
    let same_family = p.addr.is_ipv4() == q.addr.is_ipv4();
    if same_family && (p.addr.ip().is_unspecified() || q.addr.ip().is_unspecified()) {
        return Some(format!(
            "portal {} ({t}) overlaps portal {} ({t}): a wildcard address already covers it",
            p.addr, q.addr
        ));
    }
    None
}

fn unknown_backstore(kind: &str) -> String {
    format!("unknown backstore {kind:?} (expected mem, null, file, gluster)")
}

/// A gluster URL and its `?size=`, checked against the block size.
fn gluster_url(text: &str, block_size: u32) -> Result<(GlusterUrl, Option<u64>), String> {
    let mut url = GlusterUrl::parse(text)?;
    let size = match url.size.take() {
        None => None,
        Some(v) => {
            let s = parse_size(&v)?;
            check_multiple(s, block_size)?;
            Some(s)
        }
    };
    Ok((url, size))
}

/// `mem:SIZE`, `null:SIZE`, `file:PATH`, each with options `,size=SIZE`
/// (file only), `,block=512|4096`, `,ro`, `,removable`, `,serial=TEXT`,
/// `,direct` (file only). The LUN number is left 0 for the caller to set.
fn parse_lun_spec(spec: &str) -> Result<LunConfig, String> {
    const EXAMPLES: &str =
        "mem:1GiB, null:1GiB, file:/path/disk.img or gluster://HOST/VOLUME/PATH?size=1GiB";
    if spec.starts_with("gluster:") || spec.starts_with("gluster+") {
        // Commas separate servers here, so LUN options cannot follow;
        // the config file gives gluster LUNs block_size, read_only etc.
        let (url, size) = gluster_url(spec, DEFAULT_BLOCK_SIZE)?;
        if url.path.contains(',') {
            return Err(format!(
                "image path {:?} contains ','; options such as ,ro cannot follow a gluster URL \
                 here (use --config for LUN options, and for paths with ',')",
                url.path
            ));
        }
        return Ok(LunConfig {
            lun: 0,
            backstore: BackstoreSpec::Gluster { url, size },
            block_size: DEFAULT_BLOCK_SIZE,
            read_only: false,
            removable: false,
            write_cache: true,
            serial: None,
        });
    }
    let Some((kind, rest)) = spec.split_once(':') else {
        if matches!(spec, "mem" | "null" | "file") {
            return Err(format!("expected BACKSTORE:ARGS such as {EXAMPLES}"));
        }
        return Err(unknown_backstore(spec));
    };
    if !matches!(kind, "mem" | "null" | "file") {
        return Err(unknown_backstore(kind));
    }
    let mut parts = rest.split(',');
    let first = parts.next().unwrap_or("");
    let mut size: Option<u64> = None;
    let mut path: Option<PathBuf> = None;
    if kind == "file" {
        if first.is_empty() {
            return Err("file LUNs need a path: file:PATH".into());
        }
        path = Some(PathBuf::from(first));
    } else {
        if first.is_empty() {
            return Err(format!(
                "{kind} LUNs need a size: {kind}:SIZE ({SIZE_HINT})"
            ));
        }
        size = Some(parse_size(first)?);
    }
    let mut block: Option<u32> = None;
    let mut read_only = false;
    let mut removable = false;
    let mut write_cache = true;
    let mut serial: Option<String> = None;
    let mut direct = false;
    let mut seen: HashSet<&str> = HashSet::new();
    for opt in parts {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        if !seen.insert(key) {
            return Err(format!("option {key:?} is given twice"));
        }
        match (key, value) {
            ("size", Some(v)) if kind == "file" => size = Some(parse_size(v)?),
            ("size", _) if kind != "file" => {
                return Err(format!(
                    "{kind} LUNs take their size right after '{kind}:', not as size="
                ))
            }
            ("block", Some(v)) => block = Some(check_block_size(v)?),
            ("ro", None) => read_only = true,
            ("removable", None) => removable = true,
            ("write_cache", Some(v)) => write_cache = parse_on_off(v)?,
            ("direct", None) if kind == "file" => direct = true,
            ("direct", None) => return Err(format!("only file LUNs do direct I/O, not {kind}")),
            ("serial", Some(v)) => {
                check_serial(v)?;
                serial = Some(v.to_string());
            }
            _ => {
                let (file, direct) = if kind == "file" {
                    ("size=SIZE, ", ", direct")
                } else {
                    ("", "")
                };
                return Err(format!(
                    "unknown option {opt:?} (expected {file}block=512|4096, ro, removable, \
                     write_cache=on|off, serial=TEXT{direct})"
                ));
            }
        }
    }
    let block_size = block.unwrap_or(DEFAULT_BLOCK_SIZE);
    if let Some(s) = size {
        check_multiple(s, block_size)?;
    }
    let backstore = match (kind, size, path) {
        ("file", size, Some(path)) => BackstoreSpec::File { path, size, direct },
        ("mem", Some(size), _) => BackstoreSpec::Mem { size },
        (_, Some(size), _) => BackstoreSpec::Null { size },
        _ => return Err(format!("expected BACKSTORE:ARGS such as {EXAMPLES}")),
    };
    Ok(LunConfig {
        lun: 0,
        backstore,
        block_size,
        read_only,
        removable,
        write_cache,
        serial,
    })
}

/// `on`/`off` (also `true`/`false`, `1`/`0`) of a LUN spec option.
fn parse_on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{v:?} is not on or off")),
    }
}

/// `/var/lib/target-rdma` when it is (or can be made) writable by this
/// process, else `$XDG_STATE_HOME/target-rdma`, else
/// `$HOME/.local/state/target-rdma`, else `<tmp>/target-rdma`. Only reads
/// metadata; creates nothing.
pub fn default_pr_dir() -> PathBuf {
    let preferred = Path::new(DEFAULT_PR_DIR);
    let usable = if preferred.exists() {
        dir_writable(preferred)
    } else {
        preferred.parent().is_some_and(dir_writable)
    };
    if usable {
        return preferred.to_path_buf();
    }
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        let x = PathBuf::from(x);
        if x.is_absolute() {
            return x.join("target-rdma");
        }
    }
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h).join(".local/state/target-rdma");
    }
    std::env::temp_dir().join("target-rdma")
}

/// Best guess from metadata and /proc/self/status whether this process
/// may create files in `dir`.
fn dir_writable(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return false;
    };
    if !meta.is_dir() {
        return false;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    // Uid: real effective saved fs; Gid likewise.
    let Some(&euid) = field("Uid:").get(1) else {
        return false;
    };
    if euid == 0 {
        return true;
    }
    let mode = meta.mode();
    if meta.uid() == euid {
        return mode & 0o300 == 0o300;
    }
    let mut gids = field("Groups:");
    gids.extend(field("Gid:").get(1));
    if gids.contains(&meta.gid()) {
        return mode & 0o030 == 0o030;
    }
    mode & 0o003 == 0o003
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "/etc/x.toml";

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("target-rdma").chain(args.iter().copied()))
            .expect("flags parse")
    }

    /// Parsing as `load` does, on a machine whose affinity mask is not
    /// known (so core lists are not checked against it).
    fn run(args: &[&str]) -> Result<Config, ConfigError> {
        load_with_cpus(
            std::iter::once("target-rdma").chain(args.iter().copied()),
            None,
        )
    }

    #[test]
    fn cores_outside_the_affinity_mask_are_refused() {
        let with = |args: &[&str], mask: &[usize]| {
            load_with_cpus(
                std::iter::once("target-rdma").chain(args.iter().copied()),
                Some(mask),
            )
        };
        let e = with(&["--cores", "99"], &[0, 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--cores: CPU 99 is not one this process may run on (allowed: 0-1)"
        );
        assert_eq!(e.exit_code(), 2);
        let e = with(&["--cores", "0-63"], &[0, 1]).unwrap_err();
        assert!(e.to_string().contains("CPU 2 is not one"), "{e}");
        let e = with(&["--cores", "1,4"], &[0, 1, 2, 3, 5, 8, 9, 10]).unwrap_err();
        assert!(e.to_string().ends_with("(allowed: 0-3,5,8-10)"), "{e}");
        assert_eq!(
            with(&["--cores", "1,0"], &[0, 1]).unwrap().cores,
            Some(vec![1, 0])
        );
        // No list: every allowed CPU, nothing to check.
        assert_eq!(with(&[], &[0, 1]).unwrap().cores, None);
        assert_eq!(
            check_cores_allowed(&[3], &[]).unwrap_err(),
            "CPU 3 is not one this process may run on (allowed: none)"
        );
    }

    #[test]
    fn cores_in_the_config_file_are_checked_against_the_mask_too() {
        let dir = std::env::temp_dir().join(format!("trdma-cores-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "cores = \"0-2\"\n").unwrap();
        let p = path.to_str().unwrap();
        let e = load_with_cpus(["target-rdma", "--config", p], Some(&[0, 1][..])).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("config {p}: cores: CPU 2 is not one this process may run on (allowed: 0-1)")
        );
        // The flag overrides the file and is what gets checked.
        let c = load_with_cpus(
            ["target-rdma", "--config", p, "--cores", "1"],
            Some(&[0, 1][..]),
        );
        assert_eq!(c.unwrap().cores, Some(vec![1]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Flags plus a config file text, as if given with `--config /etc/x.toml`.
    fn run_file(args: &[&str], text: &str) -> Result<Config, ConfigError> {
        let c = cli(args);
        let fc = parse_file(Path::new(FILE), text)?;
        build(&c, Some((Path::new(FILE), &fc)))
    }

    fn err(r: Result<Config, ConfigError>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn one_lun(spec: &str) -> LunConfig {
        let c = run(&["--lun", spec]).unwrap();
        c.targets[0].luns[0].clone()
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn gluster_luns_default_to_interrupt_polling_unless_told() {
        let g = "gluster://127.0.0.2/gv0/disk0.img?size=1GiB";
        assert_eq!(run(&["--lun", g]).unwrap().poll, PollMode::Interrupt);
        let c = run(&["--lun", g, "--poll", "adaptive"]).unwrap();
        assert_eq!(c.poll, PollMode::Adaptive, "an explicit choice wins");
        assert_eq!(
            run(&["--lun", "mem:1GiB"]).unwrap().poll,
            PollMode::Adaptive
        );
    }

    #[test]
    fn buffer_sg_from_flag_file_and_default() {
        assert_eq!(run(&[]).unwrap().buffer_sg, BufferSg::Fallback);
        assert_eq!(
            run(&["--buffer-sg", "always"]).unwrap().buffer_sg,
            BufferSg::Always
        );
        let c = run_file(&[], "buffer_sg = \"off\"\n").unwrap();
        assert_eq!(c.buffer_sg, BufferSg::Off);
        let c = run_file(&["--buffer-sg", "always"], "buffer_sg = \"off\"\n").unwrap();
        assert_eq!(c.buffer_sg, BufferSg::Always, "the flag overrides the file");
        let e = err(run_file(&[], "buffer_sg = \"sometimes\"\n"));
        assert!(
            e.contains("buffer_sg") && e.contains("\"sometimes\""),
            "{e}"
        );
        assert!(run(&["--buffer-sg", "sometimes"]).is_err());
    }

    #[test]
    fn poll_coalesce_from_flag_file_and_default() {
        assert_eq!(run(&[]).unwrap().poll_coalesce_us, DEFAULT_POLL_COALESCE_US);
        assert_eq!(
            run(&["--poll-coalesce-us", "0"]).unwrap().poll_coalesce_us,
            0
        );
        let c = run_file(&[], "poll_coalesce_us = 120\n").unwrap();
        assert_eq!(c.poll_coalesce_us, 120);
        let c = run_file(&["--poll-coalesce-us", "7"], "poll_coalesce_us = 120\n").unwrap();
        assert_eq!(c.poll_coalesce_us, 7, "the flag overrides the file");
        let e = err(run_file(&[], "poll_coalesce_us = 5000\n"));
        assert!(e.contains("poll_coalesce_us") && e.contains("5000"), "{e}");
        let e = err(run(&["--poll-coalesce-us", "1001"]));
        assert!(e.contains("--poll-coalesce-us"), "{e}");
    }

    #[test]
    fn poll_mode_from_flag_file_and_default() {
        assert_eq!(run(&[]).unwrap().poll, PollMode::Adaptive);
        assert_eq!(run(&["--poll", "busy"]).unwrap().poll, PollMode::Busy);
        let c = run_file(&[], "poll = \"interrupt\"\n").unwrap();
        assert_eq!(c.poll, PollMode::Interrupt);
        let c = run_file(&["--poll", "busy"], "poll = \"interrupt\"\n").unwrap();
        assert_eq!(c.poll, PollMode::Busy, "the flag overrides the file");
        let e = err(run_file(&[], "poll = \"spin\"\n"));
        assert!(e.contains("poll") && e.contains("\"spin\""), "{e}");
        assert!(run(&["--poll", "spin"]).is_err());
    }

    #[test]
    fn defaults() {
        let c = run(&[]).unwrap();
        assert_eq!(c.targets.len(), 1);
        let t = &c.targets[0];
        assert_eq!(t.name, DEFAULT_TARGET_NAME);
        assert_eq!(t.alias, None);
        assert_eq!(
            t.luns,
            vec![LunConfig {
                lun: 0,
                backstore: BackstoreSpec::Mem { size: GIB },
                block_size: 512,
                read_only: false,
                removable: false,
                write_cache: true,
                serial: None,
            }]
        );
        assert!(t.allow.is_empty() && t.chap.is_none() && t.mutual_chap.is_none());
        assert_eq!(
            c.portals,
            vec![PortalConfig {
                addr: "127.0.0.1:3260".parse().unwrap(),
                transport: Transport::Tcp,
                tpgt: 1
            }]
        );
        assert_eq!(c.log_level, "info");
        assert_eq!(c.cores, None);
        assert_eq!(c.queue_depth, 128);
        assert_eq!(c.max_sessions, 64);
        assert_eq!(c.nop_interval_s, 30);
        assert_eq!(c.nop_timeout_s, 30);
        assert_eq!(c.discovery_chap, None);
        assert!(c.pr_dir.is_absolute(), "{:?}", c.pr_dir);
        assert_eq!(c.pr_dir, default_pr_dir());
        // The default LUN spec constant says the same as the built-in default.
        assert_eq!(one_lun(DEFAULT_LUN_SPEC), default_lun());
    }

    #[test]
    fn every_flag() {
        let c = run(&[
            "--portal",
            "0.0.0.0:3261",
            "--portal",
            "[::1]:3262,iser",
            "--target",
            "iqn.2026-11.io.example:t1",
            "--alias",
            "my disks",
            "--lun",
            "mem:64MiB",
            "--lun",
            "null:1T,block=4096",
            "--lun",
            "file:/srv/d.img,size=1G,block=512,ro,serial=ABC-1",
            "--chap",
            "alice:alice-secret-12",
            "--mutual-chap",
            "tgt:target-secret-12",
            "--allow",
            "iqn.1994-05.com.redhat:c1",
            "--allow",
            "eui.0123456789abcdef",
            "--discovery-chap",
            "disc:disc-secret-123",
            "--log-level",
            "debug",
            "--cores",
            "0,2,4-5",
            "--queue-depth",
            "64",
            "--max-sessions",
            "8",
            "--pr-dir",
            "/tmp/pr",
            "--nop-interval-s",
            "0",
            "--nop-timeout-s",
            "5",
        ])
        .unwrap();
        assert_eq!(c.portals.len(), 2);
        assert_eq!(c.portals[0].addr, "0.0.0.0:3261".parse().unwrap());
        assert_eq!(c.portals[0].transport, Transport::Tcp);
        assert_eq!(c.portals[1].addr, "[::1]:3262".parse().unwrap());
        assert_eq!(c.portals[1].transport, Transport::Iser);
        let t = &c.targets[0];
        assert_eq!(c.targets.len(), 1);
        assert_eq!(t.name, "iqn.2026-11.io.example:t1");
        assert_eq!(t.alias.as_deref(), Some("my disks"));
        assert_eq!(t.luns.len(), 3);
        assert_eq!(t.luns[0].lun, 0);
        assert_eq!(t.luns[0].backstore, BackstoreSpec::Mem { size: 64 << 20 });
        assert_eq!(t.luns[1].lun, 1);
        assert_eq!(t.luns[1].backstore, BackstoreSpec::Null { size: 1 << 40 });
        assert_eq!(t.luns[1].block_size, 4096);
        assert_eq!(t.luns[2].lun, 2);
        assert_eq!(
            t.luns[2].backstore,
            BackstoreSpec::File {
                path: "/srv/d.img".into(),
                size: Some(GIB),
                direct: false
            }
        );
        assert!(t.luns[2].read_only);
        assert_eq!(t.luns[2].serial.as_deref(), Some("ABC-1"));
        assert_eq!(
            t.chap,
            Some(ChapPair {
                user: "alice".into(),
                secret: "alice-secret-12".into()
            })
        );
        assert_eq!(t.mutual_chap.as_ref().unwrap().user, "tgt");
        assert_eq!(
            t.allow,
            ["iqn.1994-05.com.redhat:c1", "eui.0123456789abcdef"]
        );
        assert_eq!(c.discovery_chap.as_ref().unwrap().secret, "disc-secret-123");
        assert_eq!(c.log_level, "debug");
        assert_eq!(c.cores, Some(vec![0, 2, 4, 5]));
        assert_eq!(c.queue_depth, 64);
        assert_eq!(c.max_sessions, 8);
        assert_eq!(c.pr_dir, PathBuf::from("/tmp/pr"));
        assert_eq!(c.nop_interval_s, 0);
        assert_eq!(c.nop_timeout_s, 5);
    }

    #[test]
    fn size_forms() {
        for (text, want) in [
            ("4096", 4096u64),
            ("4k", 4096),
            ("4K", 4096),
            ("4KiB", 4096),
            ("4kib", 4096),
            ("512B", 512),
            ("64MiB", 64 << 20),
            ("64M", 64 << 20),
            ("1GiB", GIB),
            ("1G", GIB),
            ("1g", GIB),
            ("1 GiB", GIB),
            ("1TiB", 1 << 40),
            ("2P", 2 << 50),
            ("15EiB", 15 << 60),
            ("18446744073709551615", u64::MAX),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for text in [
            "", "0", "0G", "x", "12x", "1.5G", "1GB", "-1", "G", "1 G B", "1e3",
        ] {
            let e = parse_size(text).unwrap_err();
            assert!(e.contains(&format!("{text:?}")), "{text}: {e}");
        }
        assert!(parse_size("12x")
            .unwrap_err()
            .contains("use forms such as 4k, 64MiB, 1GiB"));
        assert!(parse_size("0").unwrap_err().contains("zero"));
        for text in ["16EiB", "18446744073709551616", "99999999999999999999999T"] {
            assert!(
                parse_size(text).unwrap_err().contains("too large"),
                "{text}"
            );
        }
    }

    #[test]
    fn cores_forms() {
        assert_eq!(parse_cores("0-7"), Ok((0..8).collect()));
        assert_eq!(parse_cores("0,2,4-7"), Ok(vec![0, 2, 4, 5, 6, 7]));
        assert_eq!(parse_cores("3"), Ok(vec![3]));
        assert_eq!(parse_cores("5-5"), Ok(vec![5]));
        assert_eq!(parse_cores(" 1, 0 "), Ok(vec![1, 0]));
        for bad in [
            "", " ", "a", "1-", "-1", "1,,2", "3-1", "1,1", "0-3,2", "4096", "1-2-3", "1.5",
        ] {
            let e = parse_cores(bad).unwrap_err();
            assert!(e.contains("is not a core list"), "{bad}: {e}");
        }
        assert!(parse_cores("3-1").unwrap_err().contains("backwards"));
        assert!(parse_cores("0-3,2")
            .unwrap_err()
            .contains("core 2 is listed twice"));
        let e = err(run(&["--cores", "x"]));
        assert!(e.starts_with("--cores \"x\": "), "{e}");
    }

    #[test]
    fn lun_specs() {
        let l = one_lun("mem:4k,block=4096");
        assert_eq!(
            (l.backstore, l.block_size),
            (BackstoreSpec::Mem { size: 4096 }, 4096)
        );
        let l = one_lun("null:1G,ro");
        assert_eq!(l.backstore, BackstoreSpec::Null { size: GIB });
        assert!(l.read_only && !l.removable);
        let l = one_lun("mem:1G,removable");
        assert!(l.removable && !l.read_only);
        let l = one_lun("file:/x.img,removable,ro");
        assert!(l.removable && l.read_only && l.write_cache);
        assert!(!one_lun("file:/x.img,write_cache=off").write_cache);
        assert!(one_lun("mem:1G,write_cache=on").write_cache);
        let l = one_lun("file:relative/disk.img");
        assert_eq!(
            l.backstore,
            BackstoreSpec::File {
                path: "relative/disk.img".into(),
                size: None,
                direct: false
            }
        );
        assert_eq!(l.block_size, 512);
        let l = one_lun("file:/d,direct,block=4096");
        assert_eq!(
            l.backstore,
            BackstoreSpec::File {
                path: "/d".into(),
                size: None,
                direct: true
            }
        );
        let l = one_lun("file:/d,block=4096,size=8k");
        assert_eq!(
            l.backstore,
            BackstoreSpec::File {
                path: "/d".into(),
                size: Some(8192),
                direct: false
            }
        );

        let cases: &[(&str, &str)] = &[
            (
                "foo:1G",
                "--lun \"foo:1G\": unknown backstore \"foo\" (expected mem, null, file, gluster)",
            ),
            (
                "mem:12x",
                "--lun \"mem:12x\": \"12x\" is not a size (use forms such as 4k, 64MiB, 1GiB)",
            ),
            ("gluster://host", "missing /VOLUME/PATH"),
            (
                "gluster://host/vol/img?size=1000",
                "not a multiple of the block size 512",
            ),
            ("gluster://host/vol/img?size=zz", "\"zz\" is not a size"),
            ("gluster://host:70000/vol/img", "port \"70000\""),
            (
                "gluster://h/vol/img,ro",
                "options such as ,ro cannot follow",
            ),
            ("gluster://h/vol/img?ro", "unknown query parameter"),
            ("mem", "expected BACKSTORE:ARGS"),
            ("disk.img", "unknown backstore \"disk.img\""),
            ("mem:", "mem LUNs need a size"),
            ("file:", "file LUNs need a path"),
            ("mem:0", "zero"),
            ("file:/x,write_cache=maybe", "\"maybe\" is not on or off"),
            (
                "mem:1G,block=1024",
                "block size \"1024\" is not supported (use 512 or 4096)",
            ),
            (
                "mem:1000",
                "1000 bytes is not a multiple of the block size 512",
            ),
            (
                "null:6k,block=4096",
                "6144 bytes is not a multiple of the block size 4096",
            ),
            ("file:/d,size=1000", "not a multiple of the block size 512"),
            ("file:/d,size=zz", "\"zz\" is not a size"),
            ("mem:1G,size=2G", "not as size="),
            ("mem:1G,colour=red", "unknown option \"colour=red\""),
            (
                "mem:1G,block=512,block=4096",
                "option \"block\" is given twice",
            ),
            ("mem:1G,ro=yes", "unknown option \"ro=yes\""),
            ("mem:1G,direct", "only file LUNs do direct I/O, not mem"),
            ("null:1G,direct", "only file LUNs do direct I/O, not null"),
            ("file:/d,direct=yes", "unknown option \"direct=yes\""),
            ("file:/d,direct,direct", "option \"direct\" is given twice"),
            ("file:/d,x", "serial=TEXT, direct)"),
            ("mem:1G,serial=", "is not a serial number"),
            ("mem:1G,serial=a b", "is not a serial number"),
        ];
        for (spec, want) in cases {
            let e = err(run(&["--lun", spec]));
            assert!(e.contains(want), "{spec}: {e}");
            assert!(e.starts_with(&format!("--lun {spec:?}: ")), "{spec}: {e}");
        }
    }

    #[test]
    fn gluster_luns() {
        let l = one_lun("gluster://127.0.0.2/gv0/disk0.img?size=1GiB");
        let BackstoreSpec::Gluster { url, size } = l.backstore else {
            panic!("{:?}", l.backstore)
        };
        assert_eq!(size, Some(GIB));
        assert_eq!(url.size, None, "the size moves out of the url");
        assert_eq!(
            (url.volume.as_str(), url.path.as_str()),
            ("gv0", "/disk0.img")
        );
        assert_eq!(url.servers.len(), 1);
        assert_eq!(
            (url.servers[0].host.as_str(), url.servers[0].port),
            ("127.0.0.2", 24007)
        );
        let l = one_lun("gluster://a:24010,b/v/dir/x.img");
        let BackstoreSpec::Gluster { url, size } = l.backstore else {
            panic!()
        };
        assert_eq!(size, None);
        assert_eq!(url.servers[0].port, 24010);
        assert_eq!(url.servers[1].host, "b");
        assert_eq!(url.path, "/dir/x.img");

        let text = "command_timeout_s = 12\ngluster_log_file = \"gfapi.log\"\n\
                    [[targets]]\nname = \"iqn.2026-11.io.x:g\"\n\
                    [[targets.luns]]\nbackstore = \"gluster\"\n\
                    url = \"gluster://h1,h2:24008/vol/luns/a.img\"\nsize = \"8GiB\"\n\
                    block_size = 4096\nread_only = true\n\
                    [[targets.luns]]\nbackstore = \"gluster\"\n\
                    url = \"gluster://h1/vol/b.img?size=4k\"\nblock_size = 4096\n";
        let c = run_file(&[], text).unwrap();
        assert_eq!(c.command_timeout_s, 12);
        assert_eq!(
            c.gluster_log_file.as_deref(),
            Some(Path::new("/etc/gfapi.log"))
        );
        let luns = &c.targets[0].luns;
        assert!(luns[0].read_only && luns[0].block_size == 4096);
        let BackstoreSpec::Gluster { url, size } = &luns[0].backstore else {
            panic!()
        };
        assert_eq!(
            (*size, url.servers.len(), url.path.as_str()),
            (Some(8 * GIB), 2, "/luns/a.img")
        );
        assert_eq!(
            luns[1].backstore,
            BackstoreSpec::Gluster {
                url: GlusterUrl::parse("gluster://h1/vol/b.img").unwrap(),
                size: Some(4096)
            }
        );
        // Flags override the file; defaults otherwise.
        let c = run_file(
            &["--command-timeout-s", "25", "--gluster-log-file", "x.log"],
            text,
        )
        .unwrap();
        assert_eq!(c.command_timeout_s, 25);
        assert_eq!(c.gluster_log_file.as_deref(), Some(Path::new("x.log")));
        let c = run(&[]).unwrap();
        assert_eq!(
            (c.command_timeout_s, c.gluster_log_file),
            (DEFAULT_COMMAND_TIMEOUT_S, None)
        );
        for (v, ok) in [
            ("1", false),
            ("2", true),
            ("3600", true),
            ("3601", false),
            ("x", false),
        ] {
            assert_eq!(run(&["--command-timeout-s", v]).is_ok(), ok, "{v}");
        }
        let e = err(run(&["--command-timeout-s", "1"]));
        assert!(e.contains("--command-timeout-s"), "{e}");
        // The example config has a gluster LUN and parses.
        let fc = parse_file(Path::new(FILE), example_toml()).unwrap();
        let c = build(&cli(&[]), Some((Path::new(FILE), &fc))).unwrap();
        assert!(c
            .targets
            .iter()
            .flat_map(|t| &t.luns)
            .any(|l| matches!(l.backstore, BackstoreSpec::Gluster { .. })));
    }

    #[test]
    fn portals() {
        let p = parse_portal_flag("10.0.0.1").unwrap();
        assert_eq!(p.addr, "10.0.0.1:3260".parse().unwrap());
        let p = parse_portal_flag("[::]").unwrap();
        assert_eq!(p.addr, "[::]:3260".parse().unwrap());
        let p = parse_portal_flag("::1").unwrap();
        assert_eq!(p.addr, "[::1]:3260".parse().unwrap());
        let p = parse_portal_flag("[fe80::1]:860,TCP").unwrap();
        assert_eq!((p.addr.port(), p.transport), (860, Transport::Tcp));
        assert_eq!(
            parse_portal_flag("1.2.3.4:5,iser").unwrap().transport,
            Transport::Iser
        );

        for (flag, want) in [
            ("localhost:3260", "host names are not resolved"),
            ("1.2.3.4:0", "port \"0\" is not a number in 1..=65535"),
            ("1.2.3.4:65536", "port \"65536\""),
            ("1.2.3.4:", "port \"\""),
            (
                "1.2.3.4:3260,rdma",
                "\"rdma\" is not a transport (expected tcp or iser)",
            ),
            ("1.2.3.4:3260,tcp,iser", "expected ADDR:PORT[,tcp|,iser]"),
            ("[::1:3260", "no closing ']'"),
            ("[::1]3260", "expected ':PORT'"),
            ("[1.2.3.4]:3260", "is not an IPv6 address"),
            ("fe80::zz", "is not an address"),
            ("", "is not an IP address"),
        ] {
            let e = err(run(&["--portal", flag]));
            assert!(e.starts_with(&format!("--portal {flag:?}: ")), "{e}");
            assert!(e.contains(want), "{flag}: {e}");
        }

        let e = err(run(&[
            "--portal",
            "127.0.0.1:3260",
            "--portal",
            "127.0.0.1:3260",
        ]));
        assert_eq!(
            e,
            "--portal \"127.0.0.1:3260\": portal 127.0.0.1:3260 (tcp) is listed twice"
        );
        let e = err(run(&[
            "--portal",
            "0.0.0.0:3260",
            "--portal",
            "10.1.1.1:3260",
        ]));
        assert!(e.contains("overlaps portal 0.0.0.0:3260"), "{e}");
        // Same address on another transport or another family is fine.
        let c = run(&[
            "--portal",
            "0.0.0.0:3260",
            "--portal",
            "0.0.0.0:3260,iser",
            "--portal",
            "[::]:3260",
            "--portal",
            "10.1.1.1:3261",
        ])
        .unwrap();
        assert_eq!(c.portals.len(), 4);
        assert!(c.portals.iter().all(|p| p.tpgt == DEFAULT_TPGT));
    }

    #[test]
    fn iscsi_names_in_flags() {
        let e = err(run(&["--target", "iqn.2026-11.io.x:A"]));
        assert!(e.starts_with("--target \"iqn.2026-11.io.x:A\": "), "{e}");
        let e = err(run(&["--allow", "bogus"]));
        assert!(e.starts_with("--allow \"bogus\": "), "{e}");
        let e = err(run(&[
            "--allow",
            "eui.0123456789abcdef",
            "--allow",
            "eui.0123456789abcdef",
        ]));
        assert!(e.contains("already allowed"), "{e}");
    }

    #[test]
    fn chap_flags() {
        let e = err(run(&["--chap", "bob:short"]));
        assert_eq!(
            e,
            "--chap (user \"bob\"): the CHAP secret is 5 bytes; at least 12 are required \
             (RFC 7143 9.2.1 asks for 96 bits; open-iscsi and libiscsi accept 12 and up)"
        );
        assert!(!e.contains("short\""));
        let e = err(run(&["--chap", "nocolon-secret-here"]));
        assert_eq!(e, "--chap: expected USER:SECRET");
        assert!(err(run(&["--chap", ":0123456789ab"])).contains("user name is empty"));
        let long = format!("u:{}", "s".repeat(256));
        assert!(err(run(&["--chap", &long])).contains("at most 255"));
        // Exactly 12 and 255 bytes are fine; secrets may contain ':'.
        run(&["--chap", "u:0123456789ab"]).unwrap();
        let c = run(&["--chap", &format!("u:{}", "s".repeat(255))]).unwrap();
        assert_eq!(c.targets[0].chap.as_ref().unwrap().secret.len(), 255);
        let c = run(&["--chap", "u:se:cr:et-123456"]).unwrap();
        assert_eq!(
            c.targets[0].chap.as_ref().unwrap().secret,
            "se:cr:et-123456"
        );

        let e = err(run(&["--mutual-chap", "t:target-secret-1"]));
        assert_eq!(
            e,
            "--mutual-chap: mutual CHAP needs one-way CHAP too (add chap / --chap)"
        );
        let e = err(run(&[
            "--chap",
            "i:same-secret-123",
            "--mutual-chap",
            "t:same-secret-123",
        ]));
        assert!(
            e.starts_with("--mutual-chap: the target's secret must differ"),
            "{e}"
        );
        assert!(
            err(run(&["--discovery-chap", "d:x"])).starts_with("--discovery-chap (user \"d\"): ")
        );
        // Secrets stay out of Debug output.
        let c = run(&["--chap", "u:top-secret-value"]).unwrap();
        assert!(!format!("{c:?}").contains("top-secret-value"));
    }

    #[test]
    fn settings_ranges() {
        for (flag, bad) in [
            ("--queue-depth", "0"),
            ("--queue-depth", "4097"),
            ("--max-sessions", "0"),
            ("--max-sessions", "65536"),
            ("--nop-interval-s", "3601"),
            ("--nop-timeout-s", "0"),
        ] {
            let e = err(run(&[flag, bad]));
            assert!(
                e.starts_with(&format!("{flag} \"{bad}\": {bad} is out of range")),
                "{e}"
            );
        }
        // clap refuses non-numbers and bad log levels itself.
        assert!(matches!(
            run(&["--queue-depth", "x"]),
            Err(ConfigError::Cli(_))
        ));
        assert!(matches!(
            run(&["--log-level", "loud"]),
            Err(ConfigError::Cli(_))
        ));
        assert!(matches!(run(&["--bogus"]), Err(ConfigError::Cli(_))));
        // clap refuses an empty path too.
        assert!(matches!(run(&["--pr-dir", ""]), Err(ConfigError::Cli(_))));
    }

    #[test]
    fn informational_exits() {
        for args in [&["--help"][..], &["-h"], &["--version"]] {
            let e = run(args).unwrap_err();
            assert_eq!(e.exit_code(), 0, "{args:?}");
            assert!(e.is_informational());
        }
        let help = run(&["--help"]).unwrap_err().to_string();
        for word in [
            "--portal",
            "--lun",
            "mem:SIZE",
            "--config",
            "--cores",
            "--nop-timeout-s",
        ] {
            assert!(help.contains(word), "help lacks {word}");
        }
        let e = run(&["--example-config"]).unwrap_err();
        assert_eq!(e.exit_code(), 0);
        assert_eq!(e.to_string(), example_toml());
        let e = run(&["--lun", "x:1"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(!e.is_informational());
        assert_eq!(run(&["--queue-depth", "x"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn example_parses_and_validates() {
        let c = run_file(&[], example_toml()).unwrap();
        assert_eq!(c.log_level, "info");
        assert_eq!(c.cores, Some(vec![0, 1]));
        assert_eq!(c.queue_depth, 128);
        assert_eq!(c.max_sessions, 64);
        assert_eq!(c.pr_dir, PathBuf::from("/var/lib/target-rdma"));
        assert_eq!((c.nop_interval_s, c.nop_timeout_s), (30, 30));
        assert_eq!(c.discovery_chap.as_ref().unwrap().user, "discovery");
        assert_eq!(
            c.portals,
            vec![
                PortalConfig {
                    addr: "0.0.0.0:3260".parse().unwrap(),
                    transport: Transport::Tcp,
                    tpgt: 1
                },
                PortalConfig {
                    addr: "[::]:3260".parse().unwrap(),
                    transport: Transport::Tcp,
                    tpgt: 1
                },
            ]
        );
        assert_eq!(c.targets.len(), 2);
        let t = &c.targets[0];
        assert_eq!(t.name, "iqn.2026-11.io.example:fast");
        assert_eq!(t.alias.as_deref(), Some("fast scratch disks"));
        assert_eq!(t.allow.len(), 2);
        assert_eq!(t.chap.as_ref().unwrap().secret, "client-secret-1");
        assert_eq!(t.mutual_chap.as_ref().unwrap().user, "target");
        assert_eq!(
            t.luns,
            vec![
                LunConfig {
                    lun: 0,
                    backstore: BackstoreSpec::Mem { size: 4 * GIB },
                    block_size: 4096,
                    read_only: false,
                    removable: false,
                    write_cache: true,
                    serial: None
                },
                LunConfig {
                    lun: 1,
                    backstore: BackstoreSpec::Null { size: 1 << 40 },
                    block_size: 512,
                    read_only: false,
                    removable: false,
                    write_cache: true,
                    serial: Some("NULL0001".into())
                },
            ]
        );
        let t = &c.targets[1];
        assert_eq!(t.name, "iqn.2026-11.io.example:storage");
        assert!(t.allow.is_empty() && t.chap.is_none());
        assert_eq!(t.luns.len(), 3);
        assert_eq!(t.luns[0].lun, 0);
        assert_eq!(
            t.luns[0].backstore,
            BackstoreSpec::File {
                path: "/srv/target-rdma/disk0.img".into(),
                size: None,
                direct: false
            }
        );
        assert_eq!(t.luns[1].lun, 5);
        assert!(t.luns[1].read_only);
    }

    #[test]
    fn load_reads_the_file() {
        let dir =
            std::env::temp_dir().join(format!("target-rdma-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.toml");
        std::fs::write(
            &path,
            "pr_dir = \"pr\"\n[[targets]]\nname = \"iqn.2026-11.io.x:a\"\n\
             [[targets.luns]]\nbackstore = \"file\"\npath = \"disks/a.img\"\n",
        )
        .unwrap();
        let c = run(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.pr_dir, dir.join("pr"));
        assert_eq!(
            c.targets[0].luns[0].backstore,
            BackstoreSpec::File {
                path: dir.join("disks/a.img"),
                size: None,
                direct: false
            }
        );
        // Relative paths from flags stay as given.
        let c = run(&["--config", path.to_str().unwrap(), "--pr-dir", "here"]).unwrap();
        assert_eq!(c.pr_dir, PathBuf::from("here"));
        std::fs::remove_dir_all(&dir).unwrap();

        let missing = dir.join("missing.toml");
        let e = err(run(&["--config", missing.to_str().unwrap()]));
        assert!(
            e.starts_with(&format!("config {}: cannot read: ", missing.display())),
            "{e}"
        );
    }

    const ONE_TARGET: &str = r#"
[[targets]]
name = "iqn.2026-11.io.x:a"
allow = ["iqn.1994-05.com.redhat:c1"]
[[targets.luns]]
backstore = "mem"
size = "1GiB"
[[targets.luns]]
backstore = "null"
size = 1048576
"#;

    #[test]
    fn file_field_errors() {
        let lun1 = |extra: &str| format!("{ONE_TARGET}{extra}");
        let cases: Vec<(String, &str)> = vec![
            (
                ONE_TARGET.replace("size = 1048576", "size = \"12x\""),
                "config /etc/x.toml: targets[0].luns[1].size: \"12x\" is not a size (use forms such as 4k, 64MiB, 1GiB)",
            ),
            (ONE_TARGET.replace("size = 1048576", "size = 0"), "config /etc/x.toml: targets[0].luns[1].size: 0 is zero"),
            (ONE_TARGET.replace("size = 1048576", "size = -5"), "config /etc/x.toml: targets[0].luns[1].size: -5 is not a size"),
            (ONE_TARGET.replace("size = 1048576", "size = 1.5"), "config /etc/x.toml: targets[0].luns[1].size: 1.5 is not a size"),
            (ONE_TARGET.replace("size = 1048576", "size = 1000"), "targets[0].luns[1].size: 1000 bytes is not a multiple of the block size 512"),
            (lun1("block_size = 1024\n"), "targets[0].luns[1].block_size: block size \"1024\" is not supported (use 512 or 4096)"),
            (ONE_TARGET.replace("size = 1048576", "size = 6144\nblock_size = 4096"),
                "targets[0].luns[1].size: 6144 bytes is not a multiple of the block size 4096",
            ),
            (lun1("path = \"/x\"\n"), "targets[0].luns[1].path: only file LUNs have a path"),
            (lun1("direct = true\n"), "targets[0].luns[1].direct: only file LUNs do direct I/O, not null"),
            (lun1("direct = false\n"), "targets[0].luns[1].direct: only file LUNs do direct I/O, not null"),
            (lun1("direct = 1\n"), "direct"),
            (lun1("serial = \"\"\n"), "targets[0].luns[1].serial: \"\" is not a serial number"),
            (lun1("lun = 0\n"), "targets[0].luns[1].lun: LUN 0 is already used by targets[0].luns[0]"),
            (lun1("lun = 16384\n"), "targets[0].luns[1].lun: 16384 is out of range (expected 0..=16383)"),
            (lun1("lun = -1\n"), "targets[0].luns[1].lun: -1 is out of range"),
            (ONE_TARGET.replace("size = 1048576", ""), "targets[0].luns[1].size: missing: null LUNs need a size"),
            (ONE_TARGET.replace("\"null\"", "\"foo\""), "targets[0].luns[1].backstore: unknown backstore \"foo\" (expected mem, null, file, gluster)"),
            (ONE_TARGET.replace("\"null\"", "\"gluster\""), "targets[0].luns[1].url: missing: gluster LUNs need a url"),
            (ONE_TARGET.replace("\"null\"", "\"gluster\"\nurl = \"gluster://h/v\""), "targets[0].luns[1].url: \"gluster://h/v\": missing /PATH"),
            (ONE_TARGET.replace("\"null\"", "\"gluster\"\nurl = \"gluster://h/v/i?size=1G\""), "targets[0].luns[1].size: given twice"),
            (ONE_TARGET.replace("\"null\"", "\"gluster\"\nurl = \"gluster://h/v/i\"\npath = \"/x\""), "targets[0].luns[1].path: gluster LUNs name their image with url"),
            (ONE_TARGET.replace("\"null\"", "\"gluster\"\nurl = \"gluster://h/v/i\"\ndirect = true"), "targets[0].luns[1].direct: only file LUNs do direct I/O, not gluster"),
            (ONE_TARGET.replace("\"null\"\nsize = 1048576", "\"gluster\"\nurl = \"gluster://h/v/i?size=1000\""), "targets[0].luns[1].url: 1000 bytes is not a multiple of the block size 512"),
            (lun1("url = \"gluster://h/v/i\"\n"), "targets[0].luns[1].url: only gluster LUNs have a url, not null"),
            (format!("command_timeout_s = 1\n{ONE_TARGET}"), "config /etc/x.toml: command_timeout_s: 1 is out of range"),
            (format!("gluster_log_file = \"\"\n{ONE_TARGET}"), "config /etc/x.toml: gluster_log_file: is empty"),
            (ONE_TARGET.replace("backstore = \"null\"\nsize = 1048576", "backstore = \"file\""), "targets[0].luns[1].path: missing: file LUNs need a path"),
            (ONE_TARGET.replace("backstore = \"null\"\nsize = 1048576", "backstore = \"file\"\npath = \"\""), "targets[0].luns[1].path: is empty"),
            (ONE_TARGET.replace("iqn.2026-11.io.x:a", "iqn.2026-11.io.x:A"), "config /etc/x.toml: targets[0].name: \"iqn.2026-11.io.x:A\" has uppercase"),
            (ONE_TARGET.replace("redhat:c1\"]", "redhat:c1\", \"bad\"]"), "targets[0].allow[1]: \"bad\" is not an iSCSI name"),
            (ONE_TARGET.replace("redhat:c1\"]", "redhat:c1\", \"iqn.1994-05.com.redhat:c1\"]"), "targets[0].allow[1]: \"iqn.1994-05.com.redhat:c1\" is listed twice"),
            (ONE_TARGET.replace("allow", "alias = \"\"\nallow"), "targets[0].alias: the alias is empty"),
            (
                ONE_TARGET.replace("allow", "chap = { user = \"u\", secret = \"short\" }\nallow"),
                "config /etc/x.toml: targets[0].chap.secret: the CHAP secret is 5 bytes",
            ),
            (
                ONE_TARGET.replace("allow", "chap = { user = \"\", secret = \"long-enough-123\" }\nallow"),
                "targets[0].chap.user: the CHAP user name is empty",
            ),
            (
                ONE_TARGET.replace("allow", "mutual_chap = { user = \"t\", secret = \"long-enough-123\" }\nallow"),
                "config /etc/x.toml: targets[0].mutual_chap: mutual CHAP needs one-way CHAP too",
            ),
            (
                ONE_TARGET.replace(
                    "allow",
                    "chap = { user = \"i\", secret = \"long-enough-123\" }\nmutual_chap = { user = \"t\", secret = \"long-enough-123\" }\nallow",
                ),
                "targets[0].mutual_chap: the target's secret must differ from the initiator's CHAP secret (given at config /etc/x.toml: targets[0].chap.secret",
            ),
            (format!("{ONE_TARGET}{ONE_TARGET}"), "config /etc/x.toml: targets[1].name: target \"iqn.2026-11.io.x:a\" is already defined at config /etc/x.toml: targets[0]"),
            ("[[targets]]\nname = \"iqn.2026-11.io.x:a\"\n".to_string(), "config /etc/x.toml: targets[0].luns: a target needs at least one LUN"),
            ("log_level = \"loud\"".into(), "config /etc/x.toml: log_level: \"loud\" is not a log level (expected error, warn, info, debug, trace)"),
            ("queue_depth = 0".into(), "config /etc/x.toml: queue_depth: 0 is out of range (expected 1..=4096)"),
            ("buffer_pool_mib = 8".into(), "config /etc/x.toml: buffer_pool_mib: 8 is out of range (expected 64..=65536)"),
            ("max_sessions = 70000".into(), "config /etc/x.toml: max_sessions: 70000 is out of range"),
            ("nop_interval_s = -1".into(), "config /etc/x.toml: nop_interval_s: -1 is out of range"),
            ("nop_timeout_s = 0".into(), "config /etc/x.toml: nop_timeout_s: 0 is out of range"),
            ("pr_dir = \"\"".into(), "config /etc/x.toml: pr_dir: is empty"),
            ("cores = \"2-1\"".into(), "config /etc/x.toml: cores: \"2-1\" is not a core list"),
            ("cores = [1, 1]".into(), "config /etc/x.toml: cores: core 1 is listed twice"),
            ("cores = [-1]".into(), "config /etc/x.toml: cores: -1 is not a core number"),
            ("cores = []".into(), "config /etc/x.toml: cores: [] is not a core list"),
            ("cores = 3".into(), "config /etc/x.toml: cores: 3 is not a core list"),
            ("[discovery_chap]\nuser = \"d\"\nsecret = \"x\"".into(), "config /etc/x.toml: discovery_chap.secret: the CHAP secret is 1 bytes"),
            ("[[portals]]\naddr = \"nowhere\"".into(), "config /etc/x.toml: portals[0].addr: \"nowhere\" is not an IP address"),
            ("[[portals]]\naddr = \"1.2.3.4\"\ntransport = \"udp\"".into(), "config /etc/x.toml: portals[0].transport: \"udp\" is not a transport"),
            ("[[portals]]\naddr = \"1.2.3.4\"\ntpgt = 65536".into(), "config /etc/x.toml: portals[0].tpgt: 65536 is out of range (expected 0..=65535)"),
            (
                "[[portals]]\naddr = \"1.2.3.4\"\n[[portals]]\naddr = \"1.2.3.4:3260\"".into(),
                "config /etc/x.toml: portals[1]: portal 1.2.3.4:3260 (tcp) is listed twice",
            ),
        ];
        for (text, want) in cases {
            let e = err(run_file(&[], &text));
            assert!(e.contains(want), "want {want:?}\n got {e:?}\n for {text}");
            assert!(e.starts_with("config /etc/x.toml: "), "{e}");
        }
    }

    #[test]
    fn file_parse_errors_name_the_field() {
        for (text, want) in [
            ("bogus = 1", "bogus"),
            ("[[targets]]\nname = \"iqn.2026-11.io.x:a\"\nlunz = []", "lunz"),
            (
                "[[targets]]\nname = \"iqn.2026-11.io.x:a\"\n[[targets.luns]]\nbackstore = \"mem\"\nsize = \"1G\"\nblock = 512",
                "block",
            ),
            ("[[portals]]\naddr = \"1.2.3.4\"\nport = 1", "port"),
            ("[discovery_chap]\nuser = \"d\"\nsecret = \"0123456789ab\"\nmutual = true", "mutual"),
            ("queue_depth = \"many\"", "queue_depth"),
            ("[[targets]]\nalias = \"x\"", "name"),
            ("this is not toml", "line 1"),
        ] {
            let e = run_file(&[], text).unwrap_err();
            assert!(matches!(e, ConfigError::Parse { .. }), "{text}: {e:?}");
            let e = e.to_string();
            assert!(e.starts_with("config /etc/x.toml: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn file_lun_numbering_and_forms() {
        let text = r#"
cores = [3, 1]
[[portals]]
addr = "[::1]:3261"
transport = "ISER"
tpgt = 7
[[targets]]
name = "eui.0123456789abcdef"
[[targets.luns]]
backstore = "mem"
size = "8k"
[[targets.luns]]
lun = 10
backstore = "file"
path = "/dev/sdb"
size = "4KiB"
block_size = 4096
direct = true
[[targets.luns]]
backstore = "null"
size = 4096
read_only = true
removable = true
"#;
        let c = run_file(&[], text).unwrap();
        assert_eq!(c.cores, Some(vec![3, 1]));
        assert_eq!(
            c.portals,
            vec![PortalConfig {
                addr: "[::1]:3261".parse().unwrap(),
                transport: Transport::Iser,
                tpgt: 7
            }]
        );
        let luns = &c.targets[0].luns;
        assert_eq!(luns.iter().map(|l| l.lun).collect::<Vec<_>>(), [0, 10, 11]);
        assert_eq!(
            luns[1].backstore,
            BackstoreSpec::File {
                path: "/dev/sdb".into(),
                size: Some(4096),
                direct: true
            }
        );
        assert!(luns[2].read_only && luns[2].removable);
        assert!(!luns[1].removable);
        // An empty file is fine: everything defaults.
        assert_eq!(run_file(&[], "").unwrap(), run(&[]).unwrap());
    }

    #[test]
    fn merge_settings_and_portals() {
        let text = format!(
            "log_level = \"warn\"\ncores = \"0-3\"\nqueue_depth = 32\nmax_sessions = 4\n\
             pr_dir = \"/srv/pr\"\nnop_interval_s = 10\nnop_timeout_s = 10\n\
             [discovery_chap]\nuser = \"d\"\nsecret = \"from-the-file-1\"\n\
             [[portals]]\naddr = \"10.0.0.1:3260\"\n{ONE_TARGET}"
        );
        // File values when no flags.
        let c = run_file(&[], &text).unwrap();
        assert_eq!(c.log_level, "warn");
        assert_eq!(c.cores, Some(vec![0, 1, 2, 3]));
        assert_eq!((c.queue_depth, c.max_sessions), (32, 4));
        assert_eq!(c.pr_dir, PathBuf::from("/srv/pr"));
        assert_eq!((c.nop_interval_s, c.nop_timeout_s), (10, 10));
        assert_eq!(c.portals[0].addr, "10.0.0.1:3260".parse().unwrap());
        assert_eq!(c.discovery_chap.as_ref().unwrap().secret, "from-the-file-1");
        // Flags override each.
        let c = run_file(
            &[
                "--log-level",
                "trace",
                "--cores",
                "5",
                "--queue-depth",
                "256",
                "--max-sessions",
                "9",
                "--pr-dir",
                "/other",
                "--nop-interval-s",
                "1",
                "--nop-timeout-s",
                "2",
                "--discovery-chap",
                "e:from-the-flag-1",
                "--portal",
                "10.0.0.2:3260",
                "--portal",
                "10.0.0.3:3260",
            ],
            &text,
        )
        .unwrap();
        assert_eq!(c.log_level, "trace");
        assert_eq!(c.cores, Some(vec![5]));
        assert_eq!((c.queue_depth, c.max_sessions), (256, 9));
        assert_eq!(c.pr_dir, PathBuf::from("/other"));
        assert_eq!((c.nop_interval_s, c.nop_timeout_s), (1, 2));
        assert_eq!(c.discovery_chap.as_ref().unwrap().user, "e");
        // --portal replaces the file's portals.
        let addrs: Vec<String> = c.portals.iter().map(|p| p.addr.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.2:3260", "10.0.0.3:3260"]);
        // The target is untouched by settings flags.
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].luns.len(), 2);
    }

    #[test]
    fn merge_target_flags() {
        // Target flags without --target act on the file's only target:
        // LUNs and allows are added, CHAP and alias replaced.
        let with_chap = ONE_TARGET.replace(
            "allow",
            "alias = \"old\"\nchap = { user = \"old\", secret = \"old-secret-123\" }\nallow",
        );
        let c = run_file(
            &[
                "--lun",
                "mem:1M",
                "--lun",
                "null:2M",
                "--allow",
                "iqn.1994-05.com.redhat:c2",
                "--chap",
                "new:new-secret-123",
                "--alias",
                "new",
            ],
            &with_chap,
        )
        .unwrap();
        assert_eq!(c.targets.len(), 1);
        let t = &c.targets[0];
        assert_eq!(t.name, "iqn.2026-11.io.x:a");
        assert_eq!(t.alias.as_deref(), Some("new"));
        assert_eq!(
            t.luns.iter().map(|l| l.lun).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        assert_eq!(t.luns[2].backstore, BackstoreSpec::Mem { size: 1 << 20 });
        assert_eq!(
            t.allow,
            ["iqn.1994-05.com.redhat:c1", "iqn.1994-05.com.redhat:c2"]
        );
        assert_eq!(t.chap.as_ref().unwrap().user, "new");

        // New LUNs are numbered after the highest file LUN.
        let c = run_file(&["--lun", "mem:1M"], &format!("{ONE_TARGET}lun = 9\n")).unwrap();
        assert_eq!(
            c.targets[0].luns.iter().map(|l| l.lun).collect::<Vec<_>>(),
            [0, 9, 10]
        );

        // Allow already in the file.
        let e = err(run_file(
            &["--allow", "iqn.1994-05.com.redhat:c1"],
            ONE_TARGET,
        ));
        assert_eq!(
            e,
            "--allow \"iqn.1994-05.com.redhat:c1\": \"iqn.1994-05.com.redhat:c1\" is already allowed for config /etc/x.toml: targets[0]"
        );

        // --target naming a file target selects it; a new name adds a target
        // (with the default RAM LUN when no --lun is given).
        let two = format!("{ONE_TARGET}{}", ONE_TARGET.replace("x:a", "x:b"));
        let c = run_file(&["--target", "iqn.2026-11.io.x:b", "--lun", "mem:1M"], &two).unwrap();
        assert_eq!(c.targets[0].luns.len(), 2);
        assert_eq!(c.targets[1].luns.len(), 3);
        let c = run_file(&["--target", "iqn.2026-11.io.x:c"], &two).unwrap();
        assert_eq!(c.targets.len(), 3);
        assert_eq!(c.targets[2].name, "iqn.2026-11.io.x:c");
        assert_eq!(c.targets[2].luns, vec![default_lun()]);
        let c = run_file(
            &["--target", "iqn.2026-11.io.x:c", "--lun", "null:1G"],
            &two,
        )
        .unwrap();
        assert_eq!(c.targets[2].luns.len(), 1);
        assert_eq!(
            c.targets[2].luns[0].backstore,
            BackstoreSpec::Null { size: GIB }
        );

        // Several file targets and no --target: ambiguous.
        let e = err(run_file(&["--lun", "mem:1M"], &two));
        assert_eq!(
            e,
            "--lun \"mem:1M\": the config file defines 2 targets; add --target IQN to say which \
             one this applies to (or to add a new target)"
        );
        let e = err(run_file(&["--chap", "u:long-enough-123"], &two));
        assert!(
            e.starts_with("--chap: the config file defines 2 targets"),
            "{e}"
        );

        // A file with settings only: flags build the target, default name.
        let c = run_file(&["--lun", "null:1G"], "queue_depth = 8").unwrap();
        assert_eq!(c.targets.len(), 1);
        assert_eq!(c.targets[0].name, DEFAULT_TARGET_NAME);
        assert_eq!(
            c.targets[0].luns[0].backstore,
            BackstoreSpec::Null { size: GIB }
        );
        assert_eq!(c.queue_depth, 8);

        // Mutual CHAP from a flag against one-way CHAP from the file.
        let e = err(run_file(&["--mutual-chap", "t:old-secret-123"], &with_chap));
        assert!(
            e.starts_with("--mutual-chap: the target's secret must differ from the initiator's CHAP secret (given at config /etc/x.toml: targets[0].chap.secret"),
            "{e}"
        );
        run_file(&["--mutual-chap", "t:other-secret-123"], &with_chap).unwrap();
    }

    #[test]
    fn flags_only_target_numbering() {
        let c = run(&["--lun", "mem:1M", "--lun", "mem:2M", "--lun", "mem:3M"]).unwrap();
        assert_eq!(c.targets[0].name, DEFAULT_TARGET_NAME);
        assert_eq!(
            c.targets[0].luns.iter().map(|l| l.lun).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        // --chap alone keeps the default LUN.
        let c = run(&["--chap", "u:long-enough-123"]).unwrap();
        assert_eq!(c.targets[0].luns, vec![default_lun()]);
    }

    #[test]
    fn dir_guess_is_sane() {
        assert!(dir_writable(Path::new("/tmp")) || !Path::new("/tmp").exists());
        assert!(!dir_writable(Path::new("/definitely/not/here")));
        assert!(!dir_writable(Path::new("/etc/hostname")) || !Path::new("/etc/hostname").is_dir());
    }
}
