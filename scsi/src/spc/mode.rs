//! MODE SENSE (6)/(10) and MODE SELECT (6)/(10) (SPC-4 6.11-6.14, 7.5;
//! SBC-3 6.4): caching, control, control extension and informational
//! exceptions control pages.

use super::{be16, ModeParams, SpcState, UnitAttention, MODE_SELECT_10, MODE_SENSE_10};
use crate::common::{CmdError, NexusId};
use crate::sense::Sense;
use mempool::DataBuf;

/// First line of a saved mode page file.
const MODE_FILE_MAGIC: &str = "target-rdma-mode 1";

const PAGE_CACHING: u8 = 0x08;
const PAGE_CONTROL: u8 = 0x0a;
const PAGE_IEC: u8 = 0x1c;
const PAGE_ALL: u8 = 0x3f;
const SUBPAGE_ALL: u8 = 0xff;

/// Every (page, subpage) we implement, in the order MODE SENSE returns
/// them.
const PAGES: [(u8, u8); 4] = [
    (PAGE_CACHING, 0),
    (PAGE_CONTROL, 0),
    (PAGE_CONTROL, 1),
    (PAGE_IEC, 0),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
    Saved,
}

impl SpcState {
    /// The page as MODE SENSE returns it, header included; PS set on the
    /// pages with changeable fields when the LUN has a place to save them.
    fn page(&self, page: u8, sub: u8, pc: Pc, out: &mut DataBuf) {
        let m = match pc {
            Pc::Current => self.mode,
            Pc::Default => Self::default_mode(self.caps, &self.info),
            Pc::Saved => self
                .saved_mode
                .unwrap_or_else(|| Self::default_mode(self.caps, &self.info)),
            Pc::Changeable => ModeParams {
                wce: self.caps.volatile_cache,
                d_sense: true,
                swp: true,
            },
        };
        match (page, sub) {
            (PAGE_CACHING, 0) => {
                let mut p = [0u8; 20];
                p[0] = PAGE_CACHING | self.ps_bit();
                p[1] = 0x12;
                if m.wce {
                    p[2] |= 0x04;
                }
                out.extend_from_slice(&p);
            }
            (PAGE_CONTROL, 0) => {
                let mut p = [0u8; 12];
                p[0] = PAGE_CONTROL | self.ps_bit();
                p[1] = 0x0a;
                if m.d_sense {
                    p[2] |= 0x04;
                }
                // QUEUE ALGORITHM MODIFIER 1: the backstore completes
                // commands out of order.
                if pc != Pc::Changeable {
                    p[3] = 0x10;
                }
                if m.swp {
                    p[4] |= 0x08;
                }
                out.extend_from_slice(&p);
            }
            (PAGE_CONTROL, 1) => {
                // Control extension: nothing set, nothing changeable.
                let mut p = [0u8; 32];
                p[0] = 0x40 | PAGE_CONTROL;
                p[1] = 0x01;
                p[3] = 0x1c;
                out.extend_from_slice(&p);
            }
            (PAGE_IEC, _) => {
                let mut p = [0u8; 12];
                p[0] = PAGE_IEC;
                p[1] = 0x0a;
                // DEXCPT: we never report informational exceptions.
                if pc != Pc::Changeable {
                    p[2] = 0x08;
                }
                out.extend_from_slice(&p);
            }
            _ => {}
        }
    }

    pub(super) fn mode_sense(&self, cdb: &[u8], data_in: &mut DataBuf) -> Result<(), CmdError> {
        let ten = cdb[0] == MODE_SENSE_10;
        let dbd = cdb[1] & 0x08 != 0;
        let llbaa = ten && cdb[1] & 0x10 != 0;
        let page = cdb[2] & 0x3f;
        let sub = cdb[3];
        let alloc = if ten {
            be16(cdb, 7) as usize
        } else {
            cdb[4] as usize
        };
        let pc = match cdb[2] >> 6 {
            0 => Pc::Current,
            1 => Pc::Changeable,
            2 => Pc::Default,
            _ if self.info.mode_file.is_some() => Pc::Saved,
            _ => return Err(Sense::saving_params_unsupported(2, Some(7)).into()),
        };
        let wanted: Vec<(u8, u8)> = PAGES
            .iter()
            .copied()
            .filter(|&(p, s)| match (page, sub) {
                (PAGE_ALL, 0) => s == 0,
                (PAGE_ALL, SUBPAGE_ALL) => true,
                (pg, SUBPAGE_ALL) => p == pg,
                (pg, sb) => p == pg && s == sb,
            })
            .collect();
        if wanted.is_empty() {
            return Err(
                if PAGES.iter().any(|&(p, _)| p == page) || page == PAGE_ALL {
                    Sense::invalid_field_in_cdb(3, Some(7))
                } else {
                    Sense::invalid_field_in_cdb(2, Some(5))
                }
                .into(),
            );
        }
        data_in.clear();
        let hdr = if ten { 8 } else { 4 };
        data_in.resize(hdr, 0);
        // Device-specific parameter (SBC-3 6.4.1): WP, DPOFUA.
        let mut dsp = 0x10;
        if self.write_protected() {
            dsp |= 0x80;
        }
        data_in[if ten { 3 } else { 2 }] = dsp;
        if !dbd {
            let bs = self.info.block_size;
            if llbaa {
                data_in[4] = 0x01; // LONGLBA
                data_in.extend_from_slice(&self.info.num_blocks.to_be_bytes());
                data_in.extend_from_slice(&[0, 0, 0, 0]);
                data_in.extend_from_slice(&bs.to_be_bytes());
            } else {
                // Capacities beyond 32 bits report FFFFFFFFh (SBC-3 6.4.2).
                let n = u32::try_from(self.info.num_blocks).unwrap_or(u32::MAX);
                data_in.extend_from_slice(&n.to_be_bytes());
                data_in.push(0);
                data_in.extend_from_slice(&bs.to_be_bytes()[1..]);
            }
            let bdl = data_in.len() - hdr;
            if ten {
                data_in[6..8].copy_from_slice(&(bdl as u16).to_be_bytes());
            } else {
                data_in[3] = bdl as u8;
            }
        }
        for (p, s) in wanted {
            self.page(p, s, pc, data_in);
        }
        if ten {
            let len = (data_in.len() - 2) as u16;
            data_in[0..2].copy_from_slice(&len.to_be_bytes());
        } else {
            data_in[0] = (data_in.len() - 1) as u8;
        }
        data_in.truncate(alloc);
        Ok(())
    }

    pub(super) fn mode_select(
        &mut self,
        nexus: NexusId,
        cdb: &[u8],
        data_out: &[u8],
    ) -> Result<(), CmdError> {
        let ten = cdb[0] == MODE_SELECT_10;
        // SP: save the pages too, where the LUN has a place for them.
        let save = cdb[1] & 0x01 != 0;
        if save && self.info.mode_file.is_none() {
            return Err(Sense::invalid_field_in_cdb(1, Some(0)).into());
        }
        let plen = if ten {
            be16(cdb, 7) as usize
        } else {
            cdb[4] as usize
        };
        if plen == 0 {
            return Ok(());
        }
        if data_out.len() < plen {
            return Err(Sense::param_list_length().into());
        }
        let p = &data_out[..plen];
        let hdr = if ten { 8 } else { 4 };
        if plen < hdr {
            return Err(Sense::param_list_length().into());
        }
        let (bdl, bdl_at) = if ten {
            (be16(p, 6) as usize, 6)
        } else {
            (p[3] as usize, 3)
        };
        let long = ten && p[4] & 0x01 != 0;
        if hdr + bdl > plen {
            return Err(Sense::param_list_length().into());
        }
        let dlen = if long { 16 } else { 8 };
        if bdl % dlen != 0 {
            return Err(Sense::invalid_field_in_param(bdl_at, None).into());
        }
        // Block descriptors may restate our geometry but not change it.
        for d in (hdr..hdr + bdl).step_by(dlen) {
            let (blocks, len, len_at) = if long {
                (
                    u64::from_be_bytes(p[d..d + 8].try_into().unwrap_or([0; 8])),
                    u32::from_be_bytes(p[d + 12..d + 16].try_into().unwrap_or([0; 4])),
                    d + 12,
                )
            } else {
                if p[d + 4] != 0 {
                    return Err(Sense::invalid_field_in_param((d + 4) as u16, None).into());
                }
                let n = u32::from_be_bytes(p[d..d + 4].try_into().unwrap_or([0; 4]));
                let n = if n == u32::MAX {
                    self.info.num_blocks
                } else {
                    n as u64
                };
                (
                    n,
                    u32::from_be_bytes([0, p[d + 5], p[d + 6], p[d + 7]]),
                    d + 5,
                )
            };
            if blocks != 0 && blocks != self.info.num_blocks {
                return Err(Sense::invalid_field_in_param(d as u16, None).into());
            }
            if len != self.info.block_size {
                return Err(Sense::invalid_field_in_param(len_at as u16, None).into());
            }
        }
        let mut new = self.mode;
        let mut pos = hdr + bdl;
        let mut cur = DataBuf::with_capacity(32);
        let mut mask = DataBuf::with_capacity(32);
        while pos < plen {
            if pos + 2 > plen {
                return Err(Sense::param_list_length().into());
            }
            let spf = p[pos] & 0x40 != 0;
            let page = p[pos] & 0x3f;
            let (sub, len, ph) = if spf {
                if pos + 4 > plen {
                    return Err(Sense::param_list_length().into());
                }
                (p[pos + 1], be16(p, pos + 2) as usize, 4)
            } else {
                (0, p[pos + 1] as usize, 2)
            };
            if !PAGES.contains(&(page, sub)) {
                return Err(Sense::invalid_field_in_param(pos as u16, Some(5)).into());
            }
            cur.clear();
            mask.clear();
            self.page(page, sub, Pc::Current, &mut cur);
            self.page(page, sub, Pc::Changeable, &mut mask);
            if len + ph != cur.len() {
                return Err(Sense::invalid_field_in_param((pos + 1) as u16, None).into());
            }
            if pos + ph + len > plen {
                return Err(Sense::param_list_length().into());
            }
            let given = &p[pos..pos + ph + len];
            for i in ph..cur.len() {
                let bad = (given[i] ^ cur[i]) & !mask[i];
                if bad != 0 {
                    let bit = 7 - bad.leading_zeros() as u8;
                    return Err(Sense::invalid_field_in_param((pos + i) as u16, Some(bit)).into());
                }
            }
            match (page, sub) {
                (PAGE_CACHING, 0) => new.wce = given[2] & 0x04 != 0,
                (PAGE_CONTROL, 0) => {
                    new.d_sense = given[2] & 0x04 != 0;
                    new.swp = given[4] & 0x08 != 0;
                }
                _ => {}
            }
            pos += ph + len;
        }
        if save && self.saved_mode != Some(new) {
            // Saved before anything changes: a page that cannot be kept
            // is not promised.
            if let Err(e) = self.save_mode(new) {
                tracing::error!("mode pages not saved, MODE SELECT refused: {e}");
                return Err(Sense::internal_failure().into());
            }
            self.saved_mode = Some(new);
        }
        if new != self.mode {
            self.mode = new;
            self.establish_ua(UnitAttention::ModeParametersChanged, Some(nexus));
        }
        Ok(())
    }

    fn ps_bit(&self) -> u8 {
        if self.info.mode_file.is_some() {
            0x80
        } else {
            0
        }
    }

    fn save_mode(&self, m: ModeParams) -> std::io::Result<()> {
        let Some(path) = &self.info.mode_file else {
            return Ok(());
        };
        let text = format!(
            "{MODE_FILE_MAGIC}\nwce {}\nd_sense {}\nswp {}\n",
            m.wce as u8, m.d_sense as u8, m.swp as u8
        );
        crate::persist::write_atomic(path, text.as_bytes())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
    }

    /// The saved mode parameters in `path`, `None` where none were saved.
    pub(super) fn load_mode(path: &std::path::Path) -> Result<Option<ModeParams>, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bad = |why: &str| format!("{}: {why}", path.display());
        let mut lines = text.lines();
        if lines.next() != Some(MODE_FILE_MAGIC) {
            return Err(bad("not a target-rdma saved mode page file"));
        }
        let mut m = ModeParams {
            wce: true,
            d_sense: false,
            swp: false,
        };
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| bad(&format!("cannot parse {line:?}")))?;
            let on = match value {
                "0" => false,
                "1" => true,
                _ => return Err(bad(&format!("cannot parse {line:?}"))),
            };
            match key {
                "wce" => m.wce = on,
                "d_sense" => m.d_sense = on,
                "swp" => m.swp = on,
                _ => return Err(bad(&format!("unknown field {key:?}"))),
            }
        }
        Ok(Some(m))
    }
}
