//! Login state machine internals.
use super::{LoginContext, LoginStep};
use crate::params::{TargetLimits, Transport};
use crate::pdu::Pdu;

#[derive(Default)]
pub(super) struct State {}

pub(super) fn handle(
    _limits: &TargetLimits,
    _transport: Transport,
    _st: &mut State,
    _ctx: &mut dyn LoginContext,
    _req: &Pdu,
) -> LoginStep {
    todo!("login")
}
