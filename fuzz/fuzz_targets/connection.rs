//! A connection brought to full feature phase by a scripted, valid login
//! (byte 1 picks digests, ImmediateData, InitialR2T, burst and segment
//! sizes, discovery or normal), then driven by arbitrary steps (see
//! `iscsi_fuzz`): SCSI commands with immediate, unsolicited and solicited
//! Data-Out, R2Ts, task management, NOP pings, Text and Logout. SCSI
//! commands stay with the "device server" until the input completes them,
//! so aborts and resets meet tasks in every state.
#![no_main]

use iscsi_fuzz::{config, scripted_login, Driver, FuzzCtx, Input};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input::new(data);
    // Byte 0: limits and timers (TCP only: the scripted login offers
    // TCP keys). Byte 1: what the login negotiates.
    let cfg = config(inp.u8() & 0x0f);
    let opt = inp.u8();
    let mut d = Driver::new(cfg, FuzzCtx::new(0), false);
    d.step_pdu(scripted_login(opt));
    assert!(d.ffp, "the scripted login did not reach full feature phase");
    d.run(&mut inp);
});
