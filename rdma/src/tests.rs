//! Host tests: what can be checked without an RDMA device. They cover
//! encoding, decoding and error paths only; none of them exercises a
//! device (the loopback example does that, on soft-RoCE in the VM).

use std::net::SocketAddr;
use std::path::Path;

use rdma_sys as sys;

use crate::cm::{sockaddr_from, sockaddr_to, RawEvent};
use crate::iser::{IserCmHeader, ISER_SEND_W_INV_NOT_SUPPORTED, ISER_ZBVA_NOT_SUPPORTED};
use crate::wr::fill_send_wr;
use crate::*;

fn host_has_rdma() -> bool {
    Path::new("/dev/infiniband").exists()
}

#[test]
fn without_a_device_opening_fails_cleanly() {
    if host_has_rdma() {
        eprintln!("skipped: this host has /dev/infiniband");
        return;
    }
    let e = EventChannel::new().err().expect("no channel without RDMA");
    assert!(e.is_no_device(), "{e:?}");
    assert_eq!(e.call(), "rdma_create_event_channel");
    let text = e.to_string();
    assert!(text.contains("no RDMA device"), "{text}");
    assert!(text.contains("rdma_create_event_channel"), "{text}");

    // Nothing to forget, nothing to panic about.
    release_removed_devices();
    let e = devices().err().expect("no devices without RDMA");
    assert!(e.is_no_device(), "{e:?}");
    // io::Error conversion keeps the message.
    let io: std::io::Error = e.into();
    assert!(io.to_string().contains("no RDMA device"));
}

#[test]
fn error_names_the_call_and_errno() {
    let e = Error::Call {
        call: "ibv_reg_mr_iova2",
        errno: libc::ENOMEM,
    };
    let s = e.to_string();
    assert!(s.starts_with("ibv_reg_mr_iova2 failed: "), "{s}");
    assert!(s.contains("memory"), "{s}");
    assert_eq!(e.errno(), Some(libc::ENOMEM));
    let p = Error::Post {
        call: "ibv_post_send",
        errno: libc::ENOMEM,
        index: 17,
    };
    assert!(p.to_string().contains("work request 17"));
}

#[test]
fn iser_cm_header_round_trips_and_replies() {
    // What Linux ib_iser sends: ZBVA not used, Send with Invalidate ok.
    let linux = IserCmHeader::decode(&[ISER_ZBVA_NOT_SUPPORTED, 0, 0, 0, 9, 9]).unwrap();
    assert!(linux.zbva_not_supported && !linux.send_w_inv_not_supported);
    assert_eq!(linux.encode(), [0x80, 0, 0, 0]);
    let reply = IserCmHeader::target_reply(&linux, true);
    assert_eq!(reply.encode(), [0x80, 0, 0, 0]);
    assert!(IserCmHeader::send_w_inv_agreed(&linux, &reply));

    let no_inv = IserCmHeader::decode(&[0xc0, 0xff, 0xff, 0xff]).unwrap();
    assert!(no_inv.send_w_inv_not_supported);
    let reply = IserCmHeader::target_reply(&no_inv, true);
    assert_eq!(
        reply.encode()[0],
        ISER_ZBVA_NOT_SUPPORTED | ISER_SEND_W_INV_NOT_SUPPORTED
    );
    assert!(!IserCmHeader::send_w_inv_agreed(&no_inv, &reply));
    // The target declining is enough to turn it off.
    let reply = IserCmHeader::target_reply(&linux, false);
    assert!(!IserCmHeader::send_w_inv_agreed(&linux, &reply));

    assert_eq!(IserCmHeader::decode(&[0x80, 0, 0]), None);
}

#[test]
fn private_data_is_copied_and_capped() {
    let p = PrivateData::new(&[1, 2, 3]);
    assert_eq!(&*p, &[1, 2, 3]);
    let big = [7u8; 300];
    assert_eq!(PrivateData::new(&big).len(), 255);
    assert!(PrivateData::EMPTY.is_empty());
    let too_long = ConnParam {
        private_data: &big,
        ..ConnParam::default()
    };
    let e = too_long.to_raw("rdma_accept").unwrap_err();
    assert_eq!(e.call(), "rdma_accept");
    let ok = ConnParam {
        private_data: &big[..56],
        responder_resources: 4,
        initiator_depth: 2,
        ..ConnParam::default()
    }
    .to_raw("rdma_connect")
    .unwrap();
    assert_eq!(ok.private_data_len, 56);
    assert_eq!(ok.private_data as *const u8, big.as_ptr());
    assert_eq!((ok.responder_resources, ok.initiator_depth), (4, 2));
}

#[test]
fn connect_request_event_decodes_private_data() {
    let mut wire = [0u8; 56];
    wire[..4].copy_from_slice(&[0x80, 0, 0, 0]);
    let mut ev = sys::rdma_cm_event {
        event: sys::RDMA_CM_EVENT_CONNECT_REQUEST,
        ..Default::default()
    };
    ev.param.conn = sys::rdma_conn_param {
        private_data: wire.as_ptr().cast(),
        private_data_len: 56,
        responder_resources: 16,
        initiator_depth: 8,
        ..Default::default()
    };
    // SAFETY: the stand-in's private data pointer covers its length.
    let raw = unsafe { RawEvent::read(&ev) };
    assert_eq!(raw.event, sys::RDMA_CM_EVENT_CONNECT_REQUEST);
    assert_eq!(raw.private_data.len(), 56);
    assert_eq!(
        IserCmHeader::decode(&raw.private_data),
        Some(IserCmHeader {
            zbva_not_supported: true,
            send_w_inv_not_supported: false
        })
    );
    assert_eq!((raw.responder_resources, raw.initiator_depth), (16, 8));

    // A disconnect carries no connection parameters, whatever the union
    // holds.
    ev.event = sys::RDMA_CM_EVENT_DISCONNECTED;
    // SAFETY: as above.
    let raw = unsafe { RawEvent::read(&ev) };
    assert!(raw.private_data.is_empty());
    assert_eq!(raw.responder_resources, 0);
}

fn wc(status: u32, opcode: u32, flags: u32) -> sys::ibv_wc {
    sys::ibv_wc {
        wr_id: 0xdead_beef,
        status,
        opcode,
        byte_len: 4096,
        qp_num: 17,
        wc_flags: flags,
        vendor_err: 3,
        ..Default::default()
    }
}

#[test]
fn completions_decode() {
    let mut w = wc(
        sys::IBV_WC_SUCCESS,
        sys::IBV_WC_RECV,
        sys::ibv_wc_flags::IBV_WC_WITH_INV.0,
    );
    w.__bindgen_anon_1.invalidated_rkey = 0x1234;
    let c = Completion::from_wc(&w);
    assert!(c.is_success());
    assert_eq!(c.wr_id, 0xdead_beef);
    assert_eq!(c.opcode, WcOpcode::Recv);
    assert!(c.opcode.is_recv());
    assert_eq!(c.byte_len, 4096);
    assert_eq!(c.invalidated_rkey, Some(0x1234));
    assert_eq!(c.imm_data, None);

    let mut w = wc(
        sys::IBV_WC_SUCCESS,
        sys::IBV_WC_RECV_RDMA_WITH_IMM,
        sys::ibv_wc_flags::IBV_WC_WITH_IMM.0,
    );
    w.__bindgen_anon_1.imm_data = 0x0102_0304u32.to_be();
    let c = Completion::from_wc(&w);
    assert_eq!(c.imm_data, Some(0x0102_0304));
    assert_eq!(c.invalidated_rkey, None);

    for (op, want) in [
        (sys::IBV_WC_SEND, WcOpcode::Send),
        (sys::IBV_WC_RDMA_WRITE, WcOpcode::RdmaWrite),
        (sys::IBV_WC_RDMA_READ, WcOpcode::RdmaRead),
        (sys::IBV_WC_BIND_MW, WcOpcode::BindMw),
        (999, WcOpcode::Other(999)),
    ] {
        assert_eq!(Completion::from_wc(&wc(0, op, 0)).opcode, want);
    }

    // A flushed request: status named, lengths and union not trusted.
    let c = Completion::from_wc(&wc(
        sys::IBV_WC_WR_FLUSH_ERR,
        sys::IBV_WC_RECV,
        sys::ibv_wc_flags::IBV_WC_WITH_INV.0,
    ));
    assert_eq!(c.status, WcStatus::WR_FLUSH_ERR);
    assert!(!c.is_success());
    assert_eq!(c.byte_len, 0);
    assert_eq!(c.invalidated_rkey, None);
    assert_eq!(c.vendor_err, 3);
    assert!(c.status.to_string().to_lowercase().contains("flush"));
    assert_eq!(WcStatus::SUCCESS.as_str(), "success");
}

#[test]
fn send_work_requests_fill_verbs_fields() {
    let sges = [Sge::new(0x1000, 512, 7), Sge::new(0x9000, 4096, 7)];
    let mut out = sys::ibv_send_wr::default();
    let cases = [
        (SendOp::Send, sys::IBV_WR_SEND),
        (
            SendOp::SendWithInv {
                invalidate_rkey: 0xabc,
            },
            sys::IBV_WR_SEND_WITH_INV,
        ),
        (
            SendOp::RdmaWrite {
                remote_addr: 0x7f00_0000_1000,
                rkey: 0x55,
            },
            sys::IBV_WR_RDMA_WRITE,
        ),
        (
            SendOp::RdmaRead {
                remote_addr: 0x7f00_0000_2000,
                rkey: 0x66,
            },
            sys::IBV_WR_RDMA_READ,
        ),
    ];
    for (op, opcode) in cases {
        let wr = SendWr {
            wr_id: 42,
            op,
            sges: &sges,
            flags: SendFlags::SIGNALED | SendFlags::SOLICITED,
        };
        fill_send_wr(&wr, &mut out);
        assert_eq!(out.opcode, opcode);
        assert_eq!(out.wr_id, 42);
        assert_eq!(out.num_sge, 2);
        assert!(out.next.is_null());
        assert_eq!(out.sg_list as *const Sge, sges.as_ptr());
        assert_eq!(
            out.send_flags,
            sys::ibv_send_flags::IBV_SEND_SIGNALED.0 | sys::ibv_send_flags::IBV_SEND_SOLICITED.0
        );
        // SAFETY: reading the union member the opcode says was written.
        unsafe {
            match op {
                SendOp::SendWithInv { invalidate_rkey } => {
                    assert_eq!(out.__bindgen_anon_1.invalidate_rkey, invalidate_rkey)
                }
                SendOp::RdmaWrite { remote_addr, rkey }
                | SendOp::RdmaRead { remote_addr, rkey } => {
                    assert_eq!(out.wr.rdma.remote_addr, remote_addr);
                    assert_eq!(out.wr.rdma.rkey, rkey);
                }
                SendOp::Send => {}
            }
        }
    }
    let unsignaled = SendWr {
        wr_id: 1,
        op: SendOp::Send,
        sges: &[],
        flags: SendFlags::NONE,
    };
    fill_send_wr(&unsignaled, &mut out);
    assert_eq!(out.send_flags, 0);
    assert_eq!(out.num_sge, 0);
}

#[test]
fn sge_matches_ibv_sge_and_pool_segments() {
    assert_eq!(
        std::mem::size_of::<Sge>(),
        std::mem::size_of::<sys::ibv_sge>()
    );
    let seg = mempool::RdmaSegment {
        addr: 0x20_0000,
        len: 65536,
        key: mempool::RegistrationKey {
            lkey: 0x11,
            rkey: 0x22,
        },
    };
    let s = Sge::from(seg);
    assert_eq!((s.addr(), s.length(), s.lkey()), (0x20_0000, 65536, 0x11));
}

#[test]
fn socket_addresses_convert_both_ways() {
    for text in ["169.254.77.1:3260", "[fe80::1%2]:3260", "[::1]:0"] {
        let a: SocketAddr = text.parse().unwrap();
        let (ss, len) = sockaddr_from(a);
        assert!(len as usize <= std::mem::size_of_val(&ss));
        // SAFETY: ss holds a sockaddr of the family it says.
        let back = unsafe { sockaddr_to(std::ptr::addr_of!(ss).cast()) };
        assert_eq!(back, Some(a));
    }
    // SAFETY: null is allowed.
    assert_eq!(unsafe { sockaddr_to(std::ptr::null()) }, None);
}
