//! Sense data (SPC-4 4.5): what went wrong, in fixed (0x70) or descriptor
//! (0x72) format as the control mode page's D_SENSE bit selects.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    CopyAborted = 0xa,
    AbortedCommand = 0xb,
    Miscompare = 0xe,
}

/// Sense-key specific field pointer (SPC-4 4.5.2.4.2): which byte (and
/// bit) of the CDB or parameter list was bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// C/D: true if the error is in the CDB, false if in the data.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (an LBA, or a miscompare offset).
    pub information: Option<u64>,
    pub field_pointer: Option<FieldPointer>,
}

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            information: None,
            field_pointer: None,
        }
    }

    /// INVALID COMMAND OPERATION CODE.
    pub const fn invalid_opcode() -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x20, 0x00).with_field(0, Some(7))
    }
    /// INVALID FIELD IN CDB, pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x24, 0x00).with_field(byte, bit)
    }
    /// INVALID FIELD IN PARAMETER LIST, pointing into the data-out buffer.
    pub const fn invalid_field_in_param(byte: u16, bit: Option<u8>) -> Sense {
        let mut s = Sense::new(SenseKey::IllegalRequest, 0x26, 0x00);
        s.field_pointer = Some(FieldPointer {
            in_cdb: false,
            byte,
            bit,
        });
        s
    }
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const fn lba_out_of_range() -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x21, 0x00)
    }
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const fn lun_not_supported() -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x25, 0x00)
    }
    /// PARAMETER LIST LENGTH ERROR.
    pub const fn param_list_length() -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00)
    }
    /// WRITE PROTECTED.
    pub const fn write_protected() -> Sense {
        Sense::new(SenseKey::DataProtect, 0x27, 0x00)
    }
    /// UNRECOVERED READ ERROR.
    pub const fn read_error() -> Sense {
        Sense::new(SenseKey::MediumError, 0x11, 0x00)
    }
    /// WRITE ERROR.
    pub const fn write_error() -> Sense {
        Sense::new(SenseKey::MediumError, 0x0c, 0x00)
    }
    /// INTERNAL TARGET FAILURE.
    pub const fn internal_failure() -> Sense {
        Sense::new(SenseKey::HardwareError, 0x44, 0x00)
    }
    /// LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE.
    pub const fn not_ready() -> Sense {
        Sense::new(SenseKey::NotReady, 0x04, 0x00)
    }
    /// MISCOMPARE DURING VERIFY OPERATION at byte `offset` of the data.
    pub const fn miscompare(offset: u64) -> Sense {
        let mut s = Sense::new(SenseKey::Miscompare, 0x1d, 0x00);
        s.information = Some(offset);
        s
    }

    /// NO SENSE: what REQUEST SENSE returns when nothing is pending.
    pub const fn no_sense() -> Sense {
        Sense::new(SenseKey::NoSense, 0x00, 0x00)
    }
    /// UNIT ATTENTION with the given additional sense code.
    pub const fn unit_attention(asc: u8, ascq: u8) -> Sense {
        Sense::new(SenseKey::UnitAttention, asc, ascq)
    }
    /// SAVING PARAMETERS NOT SUPPORTED (SPC-4 6.11: MODE SENSE with PC=11b
    /// when there are no saved values), pointing at the CDB field.
    pub const fn saving_params_unsupported(byte: u16, bit: Option<u8>) -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x39, 0x00).with_field(byte, bit)
    }
    /// INVALID RELEASE OF PERSISTENT RESERVATION (SPC-4 5.13.11.2).
    pub const fn invalid_release_of_pr() -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x26, 0x04)
    }
    /// INSUFFICIENT REGISTRATION RESOURCES: the registration table is full.
    pub const fn insufficient_registration_resources() -> Sense {
        Sense::new(SenseKey::IllegalRequest, 0x55, 0x04)
    }
    /// PARAMETER LIST LENGTH ERROR with the CDB field that carried it.
    pub const fn param_list_length_at(byte: u16) -> Sense {
        Sense::param_list_length().with_field(byte, None)
    }

    pub const fn with_field(mut self, byte: u16, bit: Option<u8>) -> Sense {
        self.field_pointer = Some(FieldPointer {
            in_cdb: true,
            byte,
            bit,
        });
        self
    }

    pub const fn with_information(mut self, info: u64) -> Sense {
        self.information = Some(info);
        self
    }

    /// Append the encoded sense data: descriptor format (0x72) when
    /// `descriptor` is set, else fixed format (0x70).
    pub fn encode(&self, descriptor: bool, out: &mut Vec<u8>) {
        let sks = self.field_pointer.map(|fp| {
            let mut b0 = 0x80u8; // SKSV
            if fp.in_cdb {
                b0 |= 0x40;
            }
            if let Some(bit) = fp.bit {
                b0 |= 0x08 | (bit & 7);
            }
            let [hi, lo] = fp.byte.to_be_bytes();
            [b0, hi, lo]
        });
        if descriptor {
            let start = out.len();
            out.extend_from_slice(&[0x72, self.key as u8, self.asc, self.ascq, 0, 0, 0, 0]);
            if let Some(info) = self.information {
                out.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
                out.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = sks {
                out.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
                out.extend_from_slice(&sks);
                out.push(0);
            }
            out[start + 7] = (out.len() - start - 8) as u8;
        } else {
            let mut f = [0u8; 18];
            f[0] = 0x70;
            f[2] = self.key as u8;
            if let Some(info) = self.information {
                f[0] |= 0x80; // VALID
                              // Fixed format holds 32 bits of information.
                f[3..7].copy_from_slice(&(info as u32).to_be_bytes());
            }
            f[7] = 10;
            f[12] = self.asc;
            f[13] = self.ascq;
            if let Some(sks) = sks {
                f[15..18].copy_from_slice(&sks);
            }
            out.extend_from_slice(&f);
        }
    }
}
