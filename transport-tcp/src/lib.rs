//! iSCSI over TCP.
