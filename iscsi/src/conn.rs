//! Full feature phase.
