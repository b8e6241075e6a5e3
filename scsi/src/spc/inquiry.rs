//! INQUIRY: standard data and the VPD pages (SPC-4 6.6, 7.8; SBC-3 6.6).

use super::{be16, SpcState};
use crate::common::{CmdError, NexusId};
use crate::pr::PROTOCOL_ISCSI;
use crate::sbc::limits;
use crate::sense::Sense;
use mempool::DataBuf;

const VPD_SUPPORTED: u8 = 0x00;
const VPD_UNIT_SERIAL: u8 = 0x80;
const VPD_DEVICE_ID: u8 = 0x83;
const VPD_EXTENDED_INQUIRY: u8 = 0x86;
const VPD_THIRD_PARTY_COPY: u8 = 0x8f;
const VPD_BLOCK_LIMITS: u8 = 0xb0;
const VPD_BLOCK_CHARACTERISTICS: u8 = 0xb1;
const VPD_LOGICAL_BLOCK_PROVISIONING: u8 = 0xb2;

const SUPPORTED_VPD: [u8; 8] = [
    VPD_SUPPORTED,
    VPD_UNIT_SERIAL,
    VPD_DEVICE_ID,
    VPD_EXTENDED_INQUIRY,
    VPD_THIRD_PARTY_COPY,
    VPD_BLOCK_LIMITS,
    VPD_BLOCK_CHARACTERISTICS,
    VPD_LOGICAL_BLOCK_PROVISIONING,
];

/// Version descriptors (SPC-4 table 8.8): SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00a0, 0x0960, 0x0460, 0x04c0];

/// ASCII fields are space padded; anything outside 0x20..0x7e would break
/// initiators that print them, so it becomes a space too.
fn put_ascii(out: &mut DataBuf, s: &str, n: usize) {
    let mut bytes = s.bytes();
    for _ in 0..n {
        let b = bytes.next().unwrap_or(b' ');
        out.push(if (0x20..=0x7e).contains(&b) { b } else { b' ' });
    }
}

/// Designation descriptor header (SPC-4 7.8.6.1).
fn designator(out: &mut DataBuf, proto_codeset: u8, piv_assoc_type: u8, id: &[u8]) {
    out.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, id.len() as u8]);
    out.extend_from_slice(id);
}

/// A SCSI name string designator body: UTF-8, NUL terminated, padded to
/// a multiple of four bytes, at most 256.
fn scsi_name(s: &str) -> DataBuf {
    let mut v: DataBuf = s.bytes().take(251).collect();
    v.push(0);
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
    v
}

impl SpcState {
    pub(super) fn inquiry(
        &self,
        nexus: NexusId,
        cdb: &[u8],
        data_in: &mut DataBuf,
    ) -> Result<(), CmdError> {
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        let alloc = be16(cdb, 3) as usize;
        // CMDDT is obsolete since SPC-3.
        if cdb[1] & 0x02 != 0 {
            return Err(Sense::invalid_field_in_cdb(1, Some(1)).into());
        }
        if !evpd && page != 0 {
            return Err(Sense::invalid_field_in_cdb(2, Some(7)).into());
        }
        data_in.clear();
        if !evpd {
            self.standard_inquiry(data_in);
        } else {
            data_in.extend_from_slice(&[0, page, 0, 0]);
            match page {
                VPD_SUPPORTED => data_in.extend_from_slice(&SUPPORTED_VPD),
                VPD_UNIT_SERIAL => data_in.extend_from_slice(self.serial().as_bytes()),
                VPD_DEVICE_ID => self.device_identification(nexus, data_in),
                VPD_EXTENDED_INQUIRY => self.extended_inquiry(data_in),
                VPD_THIRD_PARTY_COPY => crate::xcopy::third_party_copy_vpd(data_in),
                VPD_BLOCK_LIMITS => self.block_limits(data_in),
                VPD_BLOCK_CHARACTERISTICS => {
                    // MEDIUM ROTATION RATE 1: non-rotating medium.
                    let mut p = [0u8; 0x3c];
                    p[1] = 0x01;
                    // WABEREQ 01b: SANITIZE BLOCK ERASE (offered where
                    // blocks can be deallocated) leaves blocks that read
                    // back fine (as zeros). WACEREQ 00b: no CRYPTOGRAPHIC
                    // ERASE.
                    if self.can_unmap() {
                        p[3] = 0x40;
                    }
                    data_in.extend_from_slice(&p);
                }
                VPD_LOGICAL_BLOCK_PROVISIONING => self.logical_block_provisioning(data_in),
                _ => return Err(Sense::invalid_field_in_cdb(2, Some(7)).into()),
            }
            let len = (data_in.len() - 4) as u16;
            data_in[2..4].copy_from_slice(&len.to_be_bytes());
        }
        data_in.truncate(alloc);
        Ok(())
    }

    /// The serial number trimmed to printable ASCII, as VPD 80h wants.
    fn serial(&self) -> String {
        self.info
            .serial
            .chars()
            .filter(|c| c.is_ascii_graphic())
            .take(240)
            .collect()
    }

    fn standard_inquiry(&self, out: &mut DataBuf) {
        // Direct access block device; SPC-4; HiSup, response data format 2;
        // TPGS 01b (implicit ALUA: REPORT TARGET PORT GROUPS, no SET);
        // 3PC (EXTENDED COPY, see `xcopy`); CmdQue.
        out.extend_from_slice(&[0x00, 0x00, 0x06, 0x12, 0, 0x18, 0x00, 0x02]);
        if self.info.removable {
            out[1] |= 0x80; // RMB
        }
        put_ascii(out, &self.info.vendor, 8);
        put_ascii(out, &self.info.product, 16);
        put_ascii(out, &self.info.revision, 4);
        out.resize(58, 0);
        for v in VERSION_DESCRIPTORS {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.resize(96, 0);
        out[4] = (out.len() - 5) as u8;
    }

    fn device_identification(&self, nexus: NexusId, out: &mut DataBuf) {
        // NAA IEEE Registered Extended (binary, logical unit).
        designator(out, 0x01, 0x03, &self.info.naa);
        // T10 vendor ID: vendor identification followed by the serial.
        let mut t10 = DataBuf::with_capacity(8 + self.info.serial.len());
        put_ascii(&mut t10, &self.info.vendor, 8);
        t10.extend_from_slice(self.serial().as_bytes());
        t10.truncate(252);
        designator(out, 0x02, 0x01, &t10);
        let Some(slot) = self.nexuses.get(&nexus) else {
            return;
        };
        let n = &slot.nexus;
        let iscsi_binary = (PROTOCOL_ISCSI << 4) | 0x01;
        let iscsi_utf8 = (PROTOCOL_ISCSI << 4) | 0x03;
        // Relative target port (PIV, target port association, type 4).
        designator(
            out,
            iscsi_binary,
            0x94,
            &[0, 0, (n.tpgt >> 8) as u8, n.tpgt as u8],
        );
        // Target port group 1 (type 5).
        designator(out, iscsi_binary, 0x95, &[0, 0, 0, 1]);
        // SCSI name string of the target port and of the target device.
        designator(out, iscsi_utf8, 0x98, &scsi_name(&n.target_port_name()));
        if !n.target_name.is_empty() {
            designator(out, iscsi_utf8, 0xa8, &scsi_name(&n.target_name));
        }
    }

    fn extended_inquiry(&self, out: &mut DataBuf) {
        let mut p = [0u8; 0x3c];
        // HEADSUP, ORDSUP, SIMPSUP.
        p[1] = 0x07;
        // V_SUP: there is a volatile cache to synchronize.
        if self.caps.volatile_cache {
            p[2] = 0x01;
        }
        // LUICLR: unit attentions are cleared per I_T nexus.
        p[3] = 0x01;
        out.extend_from_slice(&p);
    }

    fn block_limits(&self, out: &mut DataBuf) {
        let mtl = self.info.max_transfer_blocks;
        let put32 =
            |p: &mut [u8], at: usize, v: u32| p[at..at + 4].copy_from_slice(&v.to_be_bytes());
        // Offsets below are from byte 4 of the page.
        let mut p = [0u8; 0x3c];
        p[0] = limits::WSNZ as u8;
        p[1] = (limits::MAX_COMPARE_AND_WRITE as u32).min(mtl).max(1) as u8;
        // OPTIMAL TRANSFER LENGTH GRANULARITY: one block.
        p[2..4].copy_from_slice(&1u16.to_be_bytes());
        put32(&mut p, 4, mtl);
        put32(&mut p, 8, mtl);
        if self.can_unmap() {
            put32(&mut p, 16, self.info.max_unmap_blocks);
            put32(&mut p, 20, self.info.max_unmap_descriptors);
            // OPTIMAL UNMAP GRANULARITY: one block.
            put32(&mut p, 24, 1);
        }
        p[32..40].copy_from_slice(&self.info.max_write_same_blocks.to_be_bytes());
        // WRITE ATOMIC(16) limits (SBC-4 6.6.4).
        put32(&mut p, 40, limits::MAX_ATOMIC_TRANSFER.min(mtl));
        put32(&mut p, 44, limits::ATOMIC_ALIGNMENT);
        put32(&mut p, 48, limits::ATOMIC_GRANULARITY);
        put32(&mut p, 52, limits::MAX_ATOMIC_BOUNDARY);
        put32(&mut p, 56, limits::MAX_ATOMIC_BOUNDARY);
        out.extend_from_slice(&p);
    }

    fn logical_block_provisioning(&self, out: &mut DataBuf) {
        if self.can_unmap() {
            // LBPU, LBPWS, LBPWS10, LBPRZ (deallocated blocks read as
            // zeros); provisioning type 010b thin.
            out.extend_from_slice(&[0, 0xe4, 0x02, 0]);
        } else {
            out.extend_from_slice(&[0, 0, 0, 0]);
        }
    }
}
