//! SBC-3 commands that move blocks through the backstore.
