//! Reservations: SPC-2 RESERVE/RELEASE (6)/(10) and SPC-4 persistent
//! reservations (PERSISTENT RESERVE IN/OUT), with APTPL state kept in a
//! file across restarts. Owned by `spc::SpcState`.
