//! Runs every SQL block of README.md, in order, in the database its `<!-- readme-test: db -->`
//! tag names, so the README cannot go stale; then checks the quick start really delivers rows.
// `cargo pgrx test` builds every test target with feature pg_test: these run in the e2e layer only.
#![cfg(not(feature = "pg_test"))]
mod common;
use common::Cluster;

/// (database, sql) for each fenced sql block; every sql block must carry a tag.
fn blocks(readme: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim() != "```sql" {
            continue;
        }
        let tag = i.checked_sub(1).map(|p| lines[p].trim()).unwrap_or("");
        let db = tag
            .strip_prefix("<!-- readme-test: ")
            .and_then(|t| t.strip_suffix(" -->"))
            .unwrap_or_else(|| panic!("README line {}: sql block without a readme-test tag", i + 1));
        let body: Vec<&str> = lines[i + 1..].iter().take_while(|l| l.trim() != "```").copied().collect();
        out.push((db.to_string(), body.join("\n")));
    }
    out
}

#[test]
fn every_sql_block_of_the_readme_runs() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let c = Cluster::start_bare(&[]);
    // what the README assumes exists: a server socket at the usual place, an operator role
    let here = format!("host={} port={}", c.dir.display(), c.port);
    c.exec("postgres", "CREATE ROLE bi_operator");
    let blocks = blocks(&readme);
    assert!(blocks.len() >= 5, "found {} sql blocks", blocks.len());
    for (db, sql) in &blocks {
        let sql = sql.replace("host=/var/run/postgresql port=5432", &here);
        // a `-- reconnect` line means: what follows runs in a new session
        let mut sessions = vec![String::new()];
        for line in sql.lines() {
            if line.starts_with("-- reconnect") {
                sessions.push(String::new());
            } else {
                sessions.last_mut().unwrap().push_str(&format!("{line}\n"));
            }
        }
        for part in &sessions {
            c.try_exec(db, part).unwrap_or_else(|e| panic!("README block in {db} failed: {e}\n{part}"));
        }
    }
    // the quick start works as written: a row inserted in the source reaches today's partition
    c.exec("source", "INSERT INTO orders VALUES (1, 'Ann', 9.99, now())");
    c.tick("orders_q");
    c.wait_caught_up("orders_q", "sales");
    let part = format!("orders_{}", c.suffix("YYYY_MM_DD"));
    assert_eq!(c.value("target", &format!("SELECT customer FROM {part} WHERE id = 1")).as_deref(), Some("Ann"));
}
