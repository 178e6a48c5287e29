//! `mig table`: every process's table, fetched over its control socket, peers linked
//! session-wide.

use crate::client::{Client, Gone};
use crate::sessions::{Live, Proc};
use anyhow::{Result, bail};
use migrt::table::ProcessTable;
use migrt::wire::{JournalView, Request, Response};

pub fn fetch(live: &Live, journal: bool) -> Result<Vec<(ProcessTable, Option<JournalView>)>> {
    let mut tables = Vec::new();
    for p in live.processes() {
        // A process that exec'd while asked closes the connection: its new program is
        // asked again (a few times: one that keeps closing it is an error).
        let mut tries = 0;
        let table = loop {
            tries += 1;
            match ask(live, &p, journal) {
                Ok(t) => break Some(t),
                // It exited since it was listed.
                Err(_) if crate::sessions::gone(p.pid) => break None,
                Err(e) if Gone::is(&e, Gone::Exited) => break None,
                Err(e) if Gone::is(&e, Gone::Ended) && tries < 10 => continue,
                Err(e) => return Err(e),
            }
        };
        tables.extend(table);
    }
    let mut plain: Vec<ProcessTable> = tables.iter().map(|(t, _)| t.clone()).collect();
    migrt::link::link_peers(&mut plain);
    for ((t, _), linked) in tables.iter_mut().zip(plain) {
        *t = linked;
    }
    Ok(tables)
}

/// One process's table (and journal).
fn ask(live: &Live, p: &Proc, journal: bool) -> Result<(ProcessTable, Option<JournalView>)> {
    let mut c = Client::connect(&live.dir, p.vpid, p.pid, live.table.signal())?;
    match c.call(&Request::Table { journal })? {
        Response::Table { table, journal } => Ok((table, journal)),
        other => bail!("process {}: unexpected answer {other:?}", p.vpid),
    }
}

pub fn text(live: &Live, journal: bool) -> Result<String> {
    Ok(crate::show::table_text(live, &fetch(live, journal)?))
}

pub fn json(live: &Live, journal: bool) -> Result<serde_json::Value> {
    Ok(crate::show::table_json(live, &fetch(live, journal)?))
}
