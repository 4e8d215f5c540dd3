//! Translates the `[cube_dispatcher]` section of a Skytools ini file into this extension's
//! settings, for users coming from the Python tool. Pure: the caller renders the result as
//! `ALTER DATABASE ... SET` statements with PostgreSQL's own quoting.
//!
//! cube_dispatcher shipped only with Skytools 2.1 (3.0 moved it to `old/`, still Python 2), so the
//! file is read the way that ran it: Python 2's `SafeConfigParser` behind `skytools.Config`
//! (python/skytools/config.py at tag skytools_2_1_13 of pgq/skytools-legacy). Where Skytools 2 and
//! 3 would read a file differently and guessing could change a job, this is an error instead: a
//! missing `job_name` (2.x used the section name, 3.x the ini file's name) and a key set twice
//! (Python 2's ConfigParser kept the last, Python 3's refuses the file). `${name}` interpolation is not
//! read: it needs `config_format = 2`, which python-skytools added in 2021 and which never ran
//! cube_dispatcher.

use crate::config::{self, SCHEMA};
use thiserror::Error;

/// One row of the import, in the order of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// `ALTER DATABASE <database> SET <guc> = <value>`
    Setting { database: String, guc: String, value: String },
    /// A note for people: one line, without a comment marker.
    Comment(String),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum IniError {
    #[error("line {line}: a setting before any [section]")]
    NoSection { line: usize },
    #[error("line {line}: expected [section], key = value, key: value or a comment, found {text:?}")]
    Syntax { line: usize, text: String },
    #[error("line {line}: {key} is set a second time in [{section}] (Python 2's ConfigParser took the last, Python 3's refuses the file); keep one")]
    Duplicate { line: usize, section: String, key: String },
    #[error("no [cube_dispatcher] section (section names are case-sensitive); the file has {}", list_sections(.found))]
    MissingSection { found: Vec<String> },
    #[error("[cube_dispatcher] sets no job_name: Skytools then used the section name (2.x: cube_dispatcher) or the ini file's name (3.x); add job_name = <the name the Python job ran as>, which also is the default pgq_consumer_id")]
    MissingJobName,
    #[error("line {line}: job_name: {reason}{hint}")]
    BadJobName { line: usize, reason: String, hint: String },
    #[error("line {line}: {key}: {why}")]
    Interpolation { line: usize, key: String, why: String },
    #[error("{}", list_unknown(.0))]
    Unknown(Vec<UnknownKey>),
    #[error("line {line}: dst_db = {shown:?} names no database; give dbname=")]
    NoDatabase { line: usize, shown: String },
}

/// A key of `[cube_dispatcher]` that is no option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    pub line: usize,
    pub key: String,
    pub nearest: Option<&'static str>,
}

fn list_sections(found: &[String]) -> String {
    if found.is_empty() {
        return "none".into();
    }
    found.iter().map(|s| format!("[{s}]")).collect::<Vec<_>>().join(", ")
}

fn list_unknown(keys: &[UnknownKey]) -> String {
    let named: Vec<String> = keys
        .iter()
        .map(|k| match k.nearest {
            Some(n) => format!("{} (line {}; did you mean {n}?)", k.key, k.line),
            None => format!("{} (line {})", k.key, k.line),
        })
        .collect();
    format!("not options of cube_dispatcher: {}", named.join(", "))
}

const MAIN: &str = "cube_dispatcher";
const DEFAULT: &str = "DEFAULT";

/// Keys of Skytools' script runner that configured the Python process itself (skytools 2.1
/// python/skytools/scripting.py; python-skytools skytools/scripting.py adds the log formats and
/// skylog_locations). The worker is a server process: these are the server's business.
const DROPPED: &[(&str, &str)] = &[
    ("pidfile", PIDFILE),
    ("logfile", LOG),
    ("log_size", LOG),
    ("log_count", LOG),
    ("logfmt_file", LOG),
    ("logdatefmt_file", LOG),
    ("logfmt_file_verbose", LOG),
    ("logdatefmt_file_verbose", LOG),
    ("logfmt_console", LOG),
    ("logdatefmt_console", LOG),
    ("logfmt_console_verbose", LOG),
    ("logdatefmt_console_verbose", LOG),
    ("use_skylog", SKYLOG),
    ("skylog_locations", SKYLOG),
];
const PIDFILE: &str = "the worker is a server process (see cube_dispatcher.status.pid and pg_stat_activity)";
const LOG: &str = "the worker writes to the server log (log_destination, logging_collector); each line names the job";
const SKYLOG: &str = "logging is PostgreSQL's (log_destination = syslog, csvlog or jsonlog)";

/// Names Skytools predefines for `%(name)s` that depend on where the script ran, which an ini
/// file's text does not tell.
const UNKNOWABLE: &[(&str, &str)] = &[
    ("host_name", "the host the Python script ran on"),
    ("config_dir", "the ini file's directory"),
    ("config_file", "the ini file's path"),
];

/// ConfigParser's MAX_INTERPOLATION_DEPTH: how a loop of references ends.
const MAX_DEPTH: usize = 10;

struct Entry {
    key: String,
    value: String,
    line: usize,
}

struct Section {
    name: String,
    entries: Vec<Entry>,
}

/// Reads sections as Python 2's ConfigParser does: only lines starting (in column 0) with `#`,
/// `;` or the word `rem` are comments; a line starting with whitespace continues the last value
/// (stripped, joined with "\n", so `key =` followed by indented lines starts with "\n"); blank
/// lines are skipped, also inside a value; `[name]` opens a section (again: it goes on); a key
/// runs up to the first `=` or `:` and is lower-cased; a value loses a ` ;` comment and
/// surrounding whitespace, and `""` is the empty string.
fn parse(ini: &str) -> Result<Vec<Section>, IniError> {
    let mut sections: Vec<Section> = Vec::new();
    let mut current: Option<usize> = None;
    // the entry a continuation line extends; none right after a section header
    let mut open: Option<usize> = None;
    for (i, line) in ini.lines().enumerate() {
        let n = i + 1;
        let indented = line.starts_with(char::is_whitespace);
        let rem = !indented && line.split_whitespace().next().is_some_and(|w| w.eq_ignore_ascii_case("rem"));
        if line.trim().is_empty() || line.starts_with(['#', ';']) || rem {
            continue;
        }
        if let (true, Some(s), Some(e)) = (indented, current, open) {
            let value = &mut sections[s].entries[e].value;
            value.push('\n');
            value.push_str(line.trim());
            continue;
        }
        if let Some(name) = section_header(line) {
            current = Some(sections.iter().position(|s| s.name == name).unwrap_or_else(|| {
                sections.push(Section { name: name.to_string(), entries: Vec::new() });
                sections.len() - 1
            }));
            open = None;
            continue;
        }
        let Some(s) = current else { return Err(IniError::NoSection { line: n }) };
        let (key, value) = option_line(line).ok_or_else(|| IniError::Syntax { line: n, text: line.to_string() })?;
        let section = &mut sections[s];
        if section.entries.iter().any(|e| e.key == key) {
            return Err(IniError::Duplicate { line: n, section: section.name.clone(), key });
        }
        section.entries.push(Entry { key, value, line: n });
        open = Some(section.entries.len() - 1);
    }
    Ok(sections)
}

/// `[name]` at the start of the line: the name runs up to the first `]`, the rest is ignored.
fn section_header(line: &str) -> Option<&str> {
    let (name, _) = line.strip_prefix('[')?.split_once(']')?;
    (!name.is_empty()).then_some(name)
}

/// `key = value` or `key: value`; None if the line is neither.
fn option_line(line: &str) -> Option<(String, String)> {
    if line.starts_with(char::is_whitespace) {
        return None;
    }
    let at = line.find([':', '='])?;
    let key = line[..at].trim_end();
    if key.is_empty() {
        return None;
    }
    let mut value = line[at + 1..].trim_start();
    // Python 2 cut at the first ';' only, and only when whitespace precedes it: `a;b` is a value
    if let Some(pos) = value.find(';').filter(|&p| value[..p].ends_with(char::is_whitespace)) {
        value = &value[..pos];
    }
    let value = match value.trim() {
        r#""""# => "",
        v => v,
    };
    // Python 2's str.lower() on a byte string: ASCII only
    Some((key.to_ascii_lowercase(), value.to_string()))
}

/// What `%(name)s` sees in `[cube_dispatcher]`: its own keys, then `[DEFAULT]`'s, then what
/// Skytools predefines.
struct Vars<'a> {
    main: &'a [Entry],
    defaults: &'a [Entry],
}

impl Vars<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let entry = self.main.iter().chain(self.defaults).find(|e| e.key == key);
        entry.map(|e| e.value.as_str()).or((key == "service_name").then_some(MAIN))
    }

    /// The value as `Config.get()` returned it.
    fn value(&self, e: &Entry) -> Result<String, IniError> {
        let mut out = String::new();
        self.interpolate(&e.value, 1, &mut out).map_err(|why| IniError::Interpolation {
            line: e.line,
            key: e.key.clone(),
            why,
        })?;
        Ok(out)
    }

    /// SafeConfigParser's interpolation: `%%` is `%`, `%(name)s` is name's value (name
    /// lower-cased, its value interpolated in turn), any other `%` is an error. Errors show no
    /// values: a connection string may hold a password.
    fn interpolate(&self, mut rest: &str, depth: usize, out: &mut String) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("%(...)s references nest deeper than {MAX_DEPTH} (a loop?)"));
        }
        while let Some(p) = rest.find('%') {
            out.push_str(&rest[..p]);
            rest = &rest[p..];
            if let Some(after) = rest.strip_prefix("%%") {
                out.push('%');
                rest = after;
            } else if let Some(after) = rest.strip_prefix("%(") {
                let (name, after) = after
                    .split_once(')')
                    .and_then(|(name, after)| Some((name, after.strip_prefix('s')?)))
                    .filter(|(name, _)| !name.is_empty())
                    .ok_or("a %( without )s after the name (write %% for a literal %)")?;
                let name = name.to_ascii_lowercase();
                let v = self.get(&name).ok_or_else(|| match UNKNOWABLE.iter().find(|(k, _)| *k == name) {
                    Some((_, what)) => format!(
                        "%({name})s is {what}, which Skytools filled in and an ini file's text does not tell; write the value out"
                    ),
                    None => format!("%({name})s names no key of [{MAIN}] or [{DEFAULT}]"),
                })?;
                if v.contains('%') {
                    self.interpolate(v, depth + 1, out)?;
                } else {
                    out.push_str(v);
                }
                rest = after;
            } else {
                return Err("'%' must be followed by '%' or '(name)s' (write %% for a literal %)".into());
            }
        }
        out.push_str(rest);
        Ok(())
    }
}

/// Whether a connection string names a host; without one, libpq inside the server falls back
/// to the server's defaults (socket directory, PG* environment), not the Python script's.
fn names_a_host(conninfo: &str) -> bool {
    let s = conninfo.trim();
    if let Some(rest) = s.strip_prefix("postgresql://").or_else(|| s.strip_prefix("postgres://")) {
        let (authority, tail) = rest.find(['/', '?']).map_or((rest, ""), |i| rest.split_at(i));
        let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let in_query = tail
            .split_once('?')
            .is_some_and(|(_, q)| q.split('&').any(|kv| kv.starts_with("host=") || kv.starts_with("hostaddr=")));
        return !(hosts.is_empty() || hosts.starts_with(':')) || in_query;
    }
    config::conninfo_pairs(s).iter().any(|(k, v)| (k == "host" || k == "hostaddr") && !v.is_empty())
}

/// The settings `[cube_dispatcher]` of `ini` gives, for the job its `job_name` names, in the
/// database its `dst_db` names (else `current_db`). Every key must be an option, `job_name`, a
/// process-level key Skytools had (dropped, with a comment saying why) or a name Skytools
/// predefines for interpolation; keys `[DEFAULT]` adds that are none of these are only noted:
/// Skytools shows them to every section, and such a file may serve other tools.
pub fn import(ini: &str, current_db: &str) -> Result<Vec<Imported>, IniError> {
    let sections = parse(ini)?;
    let Some(main) = sections.iter().find(|s| s.name == MAIN) else {
        let found = sections.iter().filter(|s| s.name != DEFAULT).map(|s| s.name.clone()).collect();
        return Err(IniError::MissingSection { found });
    };
    let defaults = sections.iter().find(|s| s.name == DEFAULT).map_or(&[][..], |s| &s.entries);
    let vars = Vars { main: &main.entries, defaults };
    let entry = |key: &str| main.entries.iter().chain(defaults).find(|e| e.key == key);

    let job_entry = entry("job_name").ok_or(IniError::MissingJobName)?;
    let job = vars.value(job_entry)?;
    if let Err(e) = config::validate_job_name(&job) {
        let hint = match entry("pgq_consumer_id") {
            Some(_) => String::new(),
            None => format!(
                "; pick another in the ini, and set pgq_consumer_id = {job} to keep the Python consumer's position in the queue"
            ),
        };
        return Err(IniError::BadJobName { line: job_entry.line, reason: e.to_string(), hint });
    }
    let database = match entry("dst_db") {
        Some(e) => match vars.value(e)? {
            v if v.trim().is_empty() => current_db.to_string(),
            v => config::dst_db_name(&v)
                .ok_or_else(|| IniError::NoDatabase { line: e.line, shown: config::mask_password(&v) })?,
        },
        None => current_db.to_string(),
    };

    // The effective keys (a [DEFAULT] key the section sets again is the section's), in file order.
    let mut keys: Vec<(&Entry, bool)> = main.entries.iter().map(|e| (e, false)).collect();
    keys.extend(defaults.iter().filter(|d| !main.entries.iter().any(|e| e.key == d.key)).map(|d| (d, true)));
    keys.sort_by_key(|(e, _)| e.line);

    let mut out = vec![Imported::Comment(format!(
        "[{MAIN}] as job {job} in database {database}{}",
        if entry("dst_db").is_some() { "" } else { " (no dst_db: the current database)" }
    ))];
    let mut unknown = Vec::new();
    for (e, from_default) in keys {
        let key = e.key.as_str();
        if key == "job_name" {
            continue; // it is part of every GUC name
        }
        if let Some((_, why)) = DROPPED.iter().find(|(k, _)| *k == key) {
            // Skytools read these only when the script used them: a reference that cannot be
            // resolved here is no reason to refuse the file
            let value = vars.value(e).unwrap_or_else(|_| e.value.clone());
            out.push(Imported::Comment(format!("{key} = {value:?} dropped: {why}")));
        } else if key == "service_name" || UNKNOWABLE.iter().any(|(k, _)| *k == key) {
            out.push(Imported::Comment(format!("{key}: a name Skytools predefines for %({key})s; not a setting")));
        } else if SCHEMA.iter().any(|o| o.name == key) {
            let value = vars.value(e)?;
            let no_host = key == "src_db" && !names_a_host(&value);
            out.push(Imported::Setting { database: database.clone(), guc: config::job_guc(&job, key), value });
            if no_host {
                out.push(Imported::Comment(
                    "src_db gives no host=: from inside the server, give host= and port= explicitly".into(),
                ));
            }
        } else if from_default {
            out.push(Imported::Comment(format!("{key} (line {}) in [{DEFAULT}] is no option: not imported", e.line)));
        } else {
            unknown.push(UnknownKey { line: e.line, key: e.key.clone(), nearest: config::nearest_option(key) });
        }
    }
    if !unknown.is_empty() {
        return Err(IniError::Unknown(unknown));
    }
    let others: Vec<String> =
        sections.iter().filter(|s| s.name != MAIN && s.name != DEFAULT).map(|s| s.name.clone()).collect();
    if !others.is_empty() {
        out.push(Imported::Comment(format!("not imported: {}", list_sections(&others))));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The "Example config file" of the original manual (doc/cube_dispatcher.txt), verbatim.
    const MANUAL: &str = "\
[cube_dispatcher]
job_name          = some_queue_to_cube
src_db            = dbname=sourcedb_test
dst_db            = dbname=dataminedb_test
pgq_queue_name    = udata.some_queue
logfile           = ~/log/%(job_name)s.log
pidfile           = ~/pid/%(job_name)s.pid
# how many rows are kept: keep_latest, keep_all
mode = keep_latest
# to_char() fmt for table suffix
#dateformat = YYYY_MM_DD
# following disables table suffixes:
#dateformat =
part_template =
     create table _DEST_TABLE (like _PARENT);
     alter table only _DEST_TABLE add primary key (_PKEY);
";

    const TEMPLATE: &str =
        "\ncreate table _DEST_TABLE (like _PARENT);\nalter table only _DEST_TABLE add primary key (_PKEY);";

    /// (database, guc, value) of the settings.
    fn settings(items: &[Imported]) -> Vec<(&str, &str, &str)> {
        items
            .iter()
            .filter_map(|i| match i {
                Imported::Setting { database, guc, value } => Some((database.as_str(), guc.as_str(), value.as_str())),
                Imported::Comment(_) => None,
            })
            .collect()
    }

    fn comments(items: &[Imported]) -> Vec<&str> {
        items
            .iter()
            .filter_map(|i| match i {
                Imported::Comment(c) => Some(c.as_str()),
                Imported::Setting { .. } => None,
            })
            .collect()
    }

    /// The settings of `[cube_dispatcher]` with `job_name = j` and `body`, as (option, value).
    fn options(body: &str) -> Result<Vec<(String, String)>, IniError> {
        let items = import(&format!("[cube_dispatcher]\njob_name = j\n{body}"), "cur")?;
        Ok(settings(&items)
            .into_iter()
            .map(|(_, guc, v)| (guc.strip_prefix("cube_dispatcher.j.").unwrap().to_string(), v.to_string()))
            .collect())
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_manuals_example() {
        let items = import(MANUAL, "postgres").unwrap();
        let db = "dataminedb_test";
        assert_eq!(
            settings(&items),
            vec![
                (db, "cube_dispatcher.some_queue_to_cube.src_db", "dbname=sourcedb_test"),
                (db, "cube_dispatcher.some_queue_to_cube.dst_db", "dbname=dataminedb_test"),
                (db, "cube_dispatcher.some_queue_to_cube.pgq_queue_name", "udata.some_queue"),
                (db, "cube_dispatcher.some_queue_to_cube.mode", "keep_latest"),
                (db, "cube_dispatcher.some_queue_to_cube.part_template", TEMPLATE),
            ]
        );
        assert_eq!(
            comments(&items),
            vec![
                "[cube_dispatcher] as job some_queue_to_cube in database dataminedb_test",
                "src_db gives no host=: from inside the server, give host= and port= explicitly",
                format!("logfile = \"~/log/some_queue_to_cube.log\" dropped: {LOG}").as_str(),
                format!("pidfile = \"~/pid/some_queue_to_cube.pid\" dropped: {PIDFILE}").as_str(),
            ]
        );
        // comments stand where their key stood
        assert!(matches!(&items[2], Imported::Comment(c) if c.starts_with("src_db gives no host")));
        assert!(matches!(&items[5], Imported::Comment(c) if c.starts_with("logfile")));
    }

    /// tests/scripts/conf/cube.ini of Skytools 3: tab-indented template, `part_template = `
    /// with a trailing blank, blank lines between keys.
    #[test]
    fn skytools_own_test_config() {
        let ini = "[cube_dispatcher]\njob_name          = cube_test\n\nsrc_db            = dbname=scriptsrc\n\
                   dst_db            = dbname=scriptdst\n\npgq_queue_name    = data.middle\n\n\
                   logfile           = sys/%(job_name)s.log\npidfile           = sys/%(job_name)s.pid\n\n\
                   # how many rows are kept: keep_latest, keep_all\nmode = keep_latest\n\npart_template = \n\
                   \tcreate table _DEST_TABLE (like _PARENT);\n\talter table only _DEST_TABLE add primary key (_PKEY);\n\n";
        let items = import(ini, "postgres").unwrap();
        assert_eq!(settings(&items).last(), Some(&("scriptdst", "cube_dispatcher.cube_test.part_template", TEMPLATE)));
        assert!(comments(&items).contains(&&*format!("logfile = \"sys/cube_test.log\" dropped: {LOG}")));
    }

    #[test]
    fn default_section_is_seen_by_the_section() {
        let ini = "[DEFAULT]\nbase = /srv/%(job_name)s\nloop_delay = 5\nmode = keep_all\n\
                   [cube_dispatcher]\njob_name = j\nmode = keep_latest\nlogfile = %(BASE)s/log\n\
                   src_db = host=%(host)s dbname=src\n[DEFAULT]\nhost = db1\n[londiste]\njob_name = other\n";
        let items = import(ini, "cur").unwrap();
        assert_eq!(
            settings(&items),
            vec![
                ("cur", "cube_dispatcher.j.loop_delay", "5"),
                ("cur", "cube_dispatcher.j.mode", "keep_latest"),
                ("cur", "cube_dispatcher.j.src_db", "host=db1 dbname=src"),
            ]
        );
        assert_eq!(
            comments(&items),
            vec![
                "[cube_dispatcher] as job j in database cur (no dst_db: the current database)",
                "base (line 2) in [DEFAULT] is no option: not imported",
                format!("logfile = \"/srv/j/log\" dropped: {LOG}").as_str(),
                "host (line 11) in [DEFAULT] is no option: not imported",
                "not imported: [londiste]",
            ]
        );
    }

    #[test]
    fn percent_signs_and_predefined_names() {
        assert_eq!(
            options("part_template = select 100%% from %(service_name)s").unwrap(),
            pairs(&[("part_template", "select 100% from cube_dispatcher")])
        );
        let err = |body: &str| match options(body).unwrap_err() {
            IniError::Interpolation { line, key, why } => (line, key, why),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err("mode = keep_latest\npgq_queue_name = %(queue)s"),
            (4, "pgq_queue_name".into(), "%(queue)s names no key of [cube_dispatcher] or [DEFAULT]".into())
        );
        assert!(err("src_db = host=%(host_name)s").2.contains("the host the Python script ran on"));
        assert!(err("src_db = password=50%off").2.starts_with("'%' must be followed by"));
        assert!(err("src_db = %(x)d").2.starts_with("a %( without )s"));
        // a reference is as good as the value: no password in the message
        let whole = options("src_db = password=secret%").unwrap_err().to_string();
        assert!(whole.starts_with("line 3: src_db: ") && !whole.contains("secret"), "{whole}");
        // a dropped key that cannot be resolved is shown as written, not an error
        let items = import("[cube_dispatcher]\njob_name = j\npidfile = %(config_dir)s/j.pid\n", "cur").unwrap();
        assert!(comments(&items)[1].starts_with("pidfile = \"%(config_dir)s/j.pid\" dropped"));
    }

    #[test]
    fn references_resolve_recursively_and_loops_end() {
        let ini = "[DEFAULT]\nroot = /data\n[cube_dispatcher]\njob_name = %(Prefix)s_%(service_name)s\n\
                   prefix = %(root)s\n";
        // prefix is no option, so this fails, but only after job_name resolved through it
        match import(ini, "cur").unwrap_err() {
            IniError::BadJobName { line: 4, reason, .. } => assert!(reason.contains("\"/data_cube_dispatcher\"")),
            other => panic!("{other:?}"),
        }
        let ini = "[cube_dispatcher]\njob_name = %(a)s\na = %(b)s\nb = %(c)s\nc = deep\n";
        assert_eq!(
            import(ini, "cur").unwrap_err().to_string(),
            "not options of cube_dispatcher: a (line 3), b (line 4), c (line 5)",
            "job_name resolved to a valid name first"
        );
        assert_eq!(
            options("pgq_queue_name = %(pgq_consumer_id)s\npgq_consumer_id = %(mode)s%%\nmode = keep_all").unwrap(),
            pairs(&[("pgq_queue_name", "keep_all%"), ("pgq_consumer_id", "keep_all%"), ("mode", "keep_all")])
        );
        match options("pgq_queue_name = %(pgq_queue_name)s").unwrap_err() {
            IniError::Interpolation { line: 3, why, .. } => assert!(why.contains("deeper than 10"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_keys_are_all_named() {
        let err = options("modee = keep_all\nsrc_db = dbname=s\npgq_lazy_fetch = 300\ndateformt = YYYY").unwrap_err();
        assert_eq!(
            err.to_string(),
            "not options of cube_dispatcher: modee (line 3; did you mean mode?), pgq_lazy_fetch (line 5), \
             dateformt (line 6; did you mean dateformat?)"
        );
    }

    #[test]
    fn section_and_job_name_are_required() {
        assert_eq!(
            import("[Cube_Dispatcher]\njob_name = j\n[DEFAULT]\na = 1\n", "cur"),
            Err(IniError::MissingSection { found: vec!["Cube_Dispatcher".into()] })
        );
        assert!(import("", "cur").unwrap_err().to_string().ends_with("the file has none"));
        assert_eq!(import("[cube_dispatcher]\nsrc_db = dbname=s\n", "cur"), Err(IniError::MissingJobName));
        let bad = import("[cube_dispatcher]\nsrc_db = dbname=s\njob_name = Some-Job\n", "cur").unwrap_err();
        assert_eq!(
            bad.to_string(),
            "line 3: job_name: invalid job name \"Some-Job\": use lower-case letters, digits and '_', at most 40 \
             bytes, not starting with a digit; pick another in the ini, and set pgq_consumer_id = Some-Job to keep \
             the Python consumer's position in the queue"
        );
        let bad = import("[cube_dispatcher]\njob_name = 1job\npgq_consumer_id = old\n", "cur").unwrap_err();
        assert!(matches!(bad, IniError::BadJobName { line: 2, ref hint, .. } if hint.is_empty()), "{bad:?}");
    }

    #[test]
    fn python_2_configparser_syntax() {
        let body = "SRC_DB: host=h dbname=s\n\
                    Mode = keep_all ; was keep_latest\n\
                    pgq_queue_name=q;1\n\
                    pgq_consumer_id = \"\"\n\
                    REM a comment\n\
                    ; also a comment\n\
                    part_template = select 1;\n\
                    \n\
                    # neither blank nor comment lines end a value\n\
                    \x20 select 2; -- x: y = z\n\
                    \x20 # indented: part of the value, as in Python 2\n\
                    pre_part:\n\
                    dateformat =\n";
        assert_eq!(
            options(body).unwrap(),
            pairs(&[
                ("src_db", "host=h dbname=s"),
                ("mode", "keep_all"),
                ("pgq_queue_name", "q;1"),
                ("pgq_consumer_id", ""),
                ("part_template", "select 1;\nselect 2; -- x: y = z\n# indented: part of the value, as in Python 2"),
                ("pre_part", ""),
                ("dateformat", ""),
            ])
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        assert_eq!(import("job_name = j\n[cube_dispatcher]\n", "c"), Err(IniError::NoSection { line: 1 }));
        assert_eq!(
            import("[cube_dispatcher]\njob_name = j\nkeep_latest\n", "c"),
            Err(IniError::Syntax { line: 3, text: "keep_latest".into() })
        );
        // Python 2 reads a header up to its first ']' and ignores the rest of the line
        assert_eq!(settings(&import("[cube_dispatcher] ; x]\njob_name = j\nmode = keep_all\n", "c").unwrap()).len(), 1);
        // an indented line right after a section header continues nothing
        assert!(matches!(import("[cube_dispatcher]\n  job_name = j\n", "c"), Err(IniError::Syntax { line: 2, .. })));
        assert_eq!(
            import(
                "[cube_dispatcher]\njob_name = j\nmode = keep_all\n[other]\n[cube_dispatcher]\nMODE = keep_latest\n",
                "c"
            ),
            Err(IniError::Duplicate { line: 6, section: "cube_dispatcher".into(), key: "mode".into() })
        );
    }

    #[test]
    fn the_database_comes_from_dst_db() {
        let first = |body: &str| match &import(&format!("[cube_dispatcher]\njob_name = j\n{body}"), "cur").unwrap()[..]
        {
            [Imported::Comment(_), Imported::Setting { database, .. }, ..] => database.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(first("mode = keep_all"), "cur");
        assert_eq!(first("mode = keep_all\ndst_db ="), "cur", "an empty dst_db is unset");
        assert_eq!(first("dst_db = postgresql://u:pw@dbhost:5433/cube?sslmode=require"), "cube");
        assert_eq!(first("dst_db = host=/tmp dbname='my db'"), "my db");
        assert_eq!(
            import("[cube_dispatcher]\njob_name = j\ndst_db = host=h password=hunter2\n", "cur")
                .unwrap_err()
                .to_string(),
            "line 3: dst_db = \"host=h password=********\" names no database; give dbname="
        );
    }

    #[test]
    fn src_db_without_a_host_is_noted() {
        let noted = |src: &str| {
            let items = import(&format!("[cube_dispatcher]\njob_name = j\nsrc_db = {src}\n"), "c").unwrap();
            comments(&items).iter().any(|c| c.starts_with("src_db gives no host="))
        };
        for src in
            ["dbname=s", "dbname=s port=5433", "postgresql:///s", "postgres://u@:5432/s", "s", "host='' dbname=s"]
        {
            assert!(noted(src), "{src}");
        }
        for src in
            ["host=db1 dbname=s", "hostaddr=10.0.0.1 dbname=s", "postgresql://u@db1/s", "postgresql:///s?host=/tmp"]
        {
            assert!(!noted(src), "{src}");
        }
    }
}
