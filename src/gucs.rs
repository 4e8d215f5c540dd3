//! The extension's own server settings, registered in one place. Job options are not GUCs of
//! ours: they are placeholders (`cube_dispatcher.<job>.<option>`) that start() reads, so the
//! `cube_dispatcher` prefix is deliberately not reserved.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// The settings below, without the `cube_dispatcher.` prefix: never taken for misspelt job options.
pub const NAMES: [&str; 1] = ["databases"];

pub static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn register() {
    GucRegistry::define_string_guc(
        c"cube_dispatcher.databases",
        c"Databases in which cube_dispatcher resumes jobs at server start (comma-separated; empty: all).",
        c"Only used when cube_dispatcher is in shared_preload_libraries.",
        &DATABASES,
        GucContext::Sighup,
        GucFlags::default(),
    );
}
