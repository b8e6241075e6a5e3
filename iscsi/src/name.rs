//! iSCSI names (RFC 7143 4.2.7): what a target or initiator name may be.
//! The config checks the names it is given with these rules, and the
//! login path bounds the names it is sent by `NAME_LEN_MAX`.

/// RFC 7143 4.2.7.1: iSCSI names are at most 223 bytes.
pub const NAME_LEN_MAX: usize = 223;

/// Check an iSCSI name (RFC 7143 4.2.7): `iqn.YYYY-MM.reversed.domain[:text]`,
/// `eui.` + 16 hex digits, `naa.` + 16 or 32 hex digits; lowercase ASCII
/// letters, digits, '-', '.', ':' only; at most 223 bytes.
pub fn check_iscsi_name(name: &str) -> Result<(), String> {
    const FORMS: &str =
        "iqn.YYYY-MM.reversed.domain[:text], eui. + 16 hex digits, or naa. + 16 or 32 hex digits";
    if name.is_empty() {
        return Err(format!("the name is empty (expected {FORMS})"));
    }
    if name.len() > NAME_LEN_MAX {
        return Err(format!(
            "{name:?} is {} bytes long; iSCSI names are at most {NAME_LEN_MAX}",
            name.len()
        ));
    }
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "{name:?} has uppercase letters; iSCSI names are lowercase (use {:?})",
            name.to_ascii_lowercase()
        ));
    }
    if let Some(c) = name.chars().find(|&c| {
        !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == ':')
    }) {
        return Err(format!(
            "{name:?} contains {c:?}; iSCSI names may hold only a-z, 0-9, '-', '.' and ':'"
        ));
    }
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(rest) = name.strip_prefix("eui.") {
        if rest.len() == 16 && hex(rest) {
            return Ok(());
        }
        return Err(format!(
            "{name:?} is not an EUI name (eui. + 16 hex digits)"
        ));
    }
    if let Some(rest) = name.strip_prefix("naa.") {
        if (rest.len() == 16 || rest.len() == 32) && hex(rest) {
            return Ok(());
        }
        return Err(format!(
            "{name:?} is not an NAA name (naa. + 16 or 32 hex digits)"
        ));
    }
    let Some(rest) = name.strip_prefix("iqn.") else {
        return Err(format!("{name:?} is not an iSCSI name (expected {FORMS})"));
    };
    let bad_iqn = |why: &str| {
        format!("{name:?} is not an iqn. name ({why}; expected iqn.YYYY-MM.reversed.domain[:text])")
    };
    let b = rest.as_bytes();
    let date_ok = b.len() >= 7
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && matches!(
            &rest[5..7],
            "01" | "02" | "03" | "04" | "05" | "06" | "07" | "08" | "09" | "10" | "11" | "12"
        );
    if !date_ok {
        return Err(bad_iqn("the date must be YYYY-MM"));
    }
    let Some(after) = rest[7..].strip_prefix('.') else {
        return Err(bad_iqn(
            "a '.' and the reversed domain must follow the date",
        ));
    };
    let authority = after.split(':').next().unwrap_or("");
    if authority.is_empty() || authority.split('.').any(|label| label.is_empty()) {
        return Err(bad_iqn(
            "the reversed domain is empty or has an empty label",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_each_form_and_why_others_are_refused() {
        for ok in [
            "iqn.2026-11.io.target-rdma:default",
            "iqn.1994-05.com.redhat:5d4c1e5f3b2",
            "iqn.2001-04.com.example",
            "iqn.2001-04.com.example:storage:diskarrays-sn-a8675309",
            "iqn.2001-04.com.example:storage.disk2.sys1.xyz",
            "eui.02004567a425678d",
            "naa.52004567ba64678d",
            "naa.62004567ba64678d0123456789abcdef",
        ] {
            assert_eq!(check_iscsi_name(ok), Ok(()), "{ok}");
        }
        for (bad, want) in [
            ("", "empty"),
            ("foo", "is not an iSCSI name"),
            ("IQN.2026-11.io.x", "uppercase"),
            ("eui.02004567A425678D", "use \"eui.02004567a425678d\""),
            ("iqn.2026-11.io.x:a_b", "contains '_'"),
            ("iqn.2026-11.io.x:a b", "contains ' '"),
            ("iqn.2026-11.io.x:é", "contains 'é'"),
            ("iqn.26-11.io.x", "the date must be YYYY-MM"),
            ("iqn.2026-13.io.x", "the date must be YYYY-MM"),
            ("iqn.2026-00.io.x", "the date must be YYYY-MM"),
            ("iqn.2026-1.io.x", "the date must be YYYY-MM"),
            ("iqn.2026-11", "must follow the date"),
            ("iqn.2026-11io.x", "must follow the date"),
            ("iqn.2026-11.", "reversed domain"),
            ("iqn.2026-11.:x", "reversed domain"),
            ("iqn.2026-11.io..x", "reversed domain"),
            ("eui.0123", "not an EUI name"),
            ("eui.0123456789abcdeg", "not an EUI name"),
            ("naa.0123456789abcdef01", "not an NAA name"),
        ] {
            let e = check_iscsi_name(bad).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
        let long = format!("iqn.2026-11.io.x:{}", "a".repeat(220));
        assert!(check_iscsi_name(&long).unwrap_err().contains("at most 223"));
    }
}
