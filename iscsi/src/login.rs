//! The login phase (RFC 7143 6, 13): security negotiation with CHAP,
//! operational negotiation, and the move to full feature phase.
//!
//! `LoginMachine` is sans-IO: it takes one Login Request PDU at a time and
//! returns the responses to send. Everything it needs from the outside (the
//! target list, ACLs, secrets, randomness, session instatement) comes
//! through `LoginContext`, so tests drive it with a plain struct.

use crate::params::{ConnParams, SessionParams, SessionType, TargetLimits, Transport};
use crate::pdu::Pdu;

/// Login response Status-Class / Status-Detail pairs (RFC 7143 11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    pub const SUCCESS: LoginStatus = LoginStatus {
        class: 0,
        detail: 0,
    };
    pub const TARGET_MOVED_TEMP: LoginStatus = LoginStatus {
        class: 1,
        detail: 1,
    };
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus {
        class: 2,
        detail: 0,
    };
    pub const AUTH_FAILURE: LoginStatus = LoginStatus {
        class: 2,
        detail: 1,
    };
    pub const AUTHORIZATION_FAILURE: LoginStatus = LoginStatus {
        class: 2,
        detail: 2,
    };
    pub const NOT_FOUND: LoginStatus = LoginStatus {
        class: 2,
        detail: 3,
    };
    pub const TARGET_REMOVED: LoginStatus = LoginStatus {
        class: 2,
        detail: 4,
    };
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus {
        class: 2,
        detail: 5,
    };
    pub const TOO_MANY_CONNECTIONS: LoginStatus = LoginStatus {
        class: 2,
        detail: 6,
    };
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus {
        class: 2,
        detail: 7,
    };
    pub const CANT_INCLUDE_IN_SESSION: LoginStatus = LoginStatus {
        class: 2,
        detail: 8,
    };
    pub const SESSION_TYPE_NOT_SUPPORTED: LoginStatus = LoginStatus {
        class: 2,
        detail: 9,
    };
    pub const SESSION_DOES_NOT_EXIST: LoginStatus = LoginStatus {
        class: 2,
        detail: 0x0a,
    };
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus {
        class: 2,
        detail: 0x0b,
    };
    pub const TARGET_ERROR: LoginStatus = LoginStatus {
        class: 3,
        detail: 0,
    };
    pub const SERVICE_UNAVAILABLE: LoginStatus = LoginStatus {
        class: 3,
        detail: 1,
    };
    pub const OUT_OF_RESOURCES: LoginStatus = LoginStatus {
        class: 3,
        detail: 2,
    };
}

/// CHAP credentials the target requires for one target (or for discovery).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChapConfig {
    /// The initiator must authenticate as this user with this secret.
    /// `None`: no authentication required (AuthMethod=None accepted).
    pub initiator: Option<(String, String)>,
    /// Mutual CHAP: the target authenticates to the initiator with this
    /// user and secret when the initiator asks for it.
    pub target: Option<(String, String)>,
}

/// What the login phase asks the target about. Implemented by the engine.
pub trait LoginContext {
    /// Target Portal Group Tag of the portal this connection arrived on.
    fn portal_group_tag(&self) -> u16;
    /// Whether a target of this name is served on this portal.
    fn target_exists(&self, target_name: &str) -> bool;
    /// Whether `initiator_name` may log in to `target_name` (ACL).
    fn initiator_allowed(&self, target_name: &str, initiator_name: &str) -> bool;
    /// CHAP requirements for `target_name`; `None` names a discovery session.
    fn chap(&self, target_name: Option<&str>) -> ChapConfig;
    /// Fill `buf` from a CSPRNG (CHAP challenges and identifiers).
    fn fill_random(&mut self, buf: &mut [u8]);
    /// Called once, just before the final Login Response: instate a new
    /// session (TSIH 0 in the request, which also reinstates any session
    /// with the same initiator name, ISID and target) or add/reinstate a
    /// connection in an existing one. Returns the session's TSIH.
    fn instate_session(&mut self, req: &SessionRequest) -> Result<u16, LoginStatus>;
    /// TargetAlias to announce for `target_name` (RFC 7143 13.6), if one
    /// is configured.
    fn target_alias(&self, _target_name: &str) -> Option<String> {
        None
    }
    /// Authentication before authorization: whether some target here
    /// requires CHAP. Then an unknown target name, and an initiator a
    /// CHAP-protected target does not allow, are not refused at the first
    /// request (02/03, 02/02) but go through the whole CHAP exchange and
    /// fail at its end with 02/01 and the same response a wrong secret
    /// gets, so that names cannot be probed without the secret.
    fn authenticate_first(&self) -> bool {
        false
    }
}

/// What `instate_session` is asked to do.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub initiator_name: String,
    pub target_name: String,
    pub session_type: SessionType,
    pub isid: u64,
    /// TSIH from the Login Request: 0 for a new session.
    pub tsih: u16,
    pub cid: u16,
}

/// Everything full feature phase needs from a successful login.
#[derive(Debug, Clone)]
pub struct LoginOutcome {
    pub session: SessionParams,
    pub conn: ConnParams,
    pub isid: u64,
    pub tsih: u16,
    pub cid: u16,
    /// CmdSN the target expects next (from the last Login Request).
    pub exp_cmdsn: u32,
    /// StatSN to use for the first response in full feature phase.
    pub next_statsn: u32,
}

/// Result of feeding one Login Request to the machine.
#[derive(Debug)]
pub enum LoginStep {
    /// Send these responses and wait for the next request.
    Continue(Vec<Pdu>),
    /// Send these responses; the connection is in full feature phase.
    Complete {
        responses: Vec<Pdu>,
        outcome: Box<LoginOutcome>,
    },
    /// Send this response (non-zero status class), then close.
    Failed(Pdu),
}

/// Per-connection login state machine. See the module docs.
pub struct LoginMachine {
    limits: TargetLimits,
    transport: Transport,
    // Implementation state lives below (owned by the login implementation).
    st: state::State,
}

impl LoginMachine {
    pub fn new(limits: TargetLimits, transport: Transport) -> Self {
        LoginMachine {
            limits,
            transport,
            st: state::State::default(),
        }
    }

    /// Feed one Login Request (opcode 0x03).
    pub fn handle(&mut self, ctx: &mut dyn LoginContext, req: &Pdu) -> LoginStep {
        state::handle(&self.limits, self.transport, &mut self.st, ctx, req)
    }

    /// The InitiatorName of the first complete request, once it was
    /// accepted (for the engine's logs and its failed-login accounting).
    pub fn initiator_name(&self) -> Option<&str> {
        self.st.initiator_name()
    }

    /// The status the login failed with, once it has.
    pub fn failure(&self) -> Option<LoginStatus> {
        self.st.failure()
    }
}

mod auth;
pub(crate) mod negotiate;
mod state;
#[cfg(test)]
mod tests;
