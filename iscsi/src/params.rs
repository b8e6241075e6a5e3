//! Operational parameters: what this target offers (`TargetLimits`) and what
//! login negotiated (`SessionParams`, `ConnParams`), with RFC 7143 defaults.

/// Which transport carries the connection; iSER changes the key set
/// (RFC 7145 6): RDMAExtensions, Target/InitiatorRecvDataSegmentLength,
/// no digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Tcp,
    Iser,
}

/// The target's side of negotiation: its maxima and preferences. Every
/// field is a hard limit the connection layer also enforces.
#[derive(Debug, Clone)]
pub struct TargetLimits {
    /// MaxRecvDataSegmentLength we declare: the largest data segment we
    /// accept in one PDU.
    pub max_recv_data_segment_length: u32,
    /// Largest MaxBurstLength we agree to.
    pub max_burst_length: u32,
    /// Largest FirstBurstLength we agree to.
    pub first_burst_length: u32,
    /// Largest MaxOutstandingR2T we agree to.
    pub max_outstanding_r2t: u16,
    /// Largest MaxConnections we agree to.
    pub max_connections: u16,
    /// Highest ErrorRecoveryLevel we support.
    pub error_recovery_level: u8,
    /// Whether we accept ImmediateData=Yes.
    pub immediate_data: bool,
    /// Whether we require InitialR2T=Yes.
    pub initial_r2t: bool,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    /// Commands the target queues per session: MaxCmdSN - ExpCmdSN + 1.
    pub queue_depth: u32,
    /// Largest EDTL accepted for a write (the buffer is sized from it).
    pub max_cmd_data_len: u32,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 16 * 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 16,
            max_connections: 1,
            error_recovery_level: 0,
            immediate_data: true,
            initial_r2t: false,
            default_time2wait: 2,
            default_time2retain: 20,
            queue_depth: 128,
            max_cmd_data_len: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionType {
    #[default]
    Normal,
    Discovery,
}

/// Session-wide results of operational negotiation (RFC 7143 13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    /// Empty for discovery sessions.
    pub target_name: String,
    pub max_connections: u16,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_burst_length: u32,
    pub first_burst_length: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    pub max_outstanding_r2t: u16,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub error_recovery_level: u8,
}

impl Default for SessionParams {
    /// RFC 7143 defaults, which hold for any key the initiator never sent.
    fn default() -> Self {
        SessionParams {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: String::new(),
            max_connections: 1,
            initial_r2t: true,
            immediate_data: true,
            max_burst_length: 262_144,
            first_burst_length: 65_536,
            default_time2wait: 2,
            default_time2retain: 20,
            max_outstanding_r2t: 1,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            error_recovery_level: 0,
        }
    }
}

/// Per-connection results of negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnParams {
    pub transport: Transport,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data segment we accept (what we declared).
    pub max_recv_data_segment_length: u32,
    /// Largest data segment we may send (what the initiator declared as its
    /// MaxRecvDataSegmentLength; 8192 when it declared nothing).
    pub max_xmit_data_segment_length: u32,
}

impl Default for ConnParams {
    fn default() -> Self {
        ConnParams {
            transport: Transport::Tcp,
            header_digest: false,
            data_digest: false,
            max_recv_data_segment_length: 8192,
            max_xmit_data_segment_length: 8192,
        }
    }
}
