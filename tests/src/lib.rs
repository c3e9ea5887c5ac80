//! Test rig: guests, daemons and hosts for the end-to-end tests.
