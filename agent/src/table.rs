//! `mig table`: every process's table, fetched over its control socket, peers linked
//! session-wide.

use crate::client::Client;
use crate::sessions::Live;
use anyhow::{Result, bail};
use migrt::table::ProcessTable;
use migrt::wire::{JournalView, Request, Response};

pub fn fetch(live: &Live, journal: bool) -> Result<Vec<(ProcessTable, Option<JournalView>)>> {
    let mut tables = Vec::new();
    for p in live.processes() {
        let mut c = match Client::connect(&live.dir, p.vpid, p.pid, live.table.signal()) {
            Ok(c) => c,
            // It may have exited since it was listed.
            Err(_) if crate::sessions::gone(p.pid) => continue,
            Err(e) => return Err(e),
        };
        match c.call(&Request::Table { journal }) {
            Ok(Response::Table { table, journal }) => tables.push((table, journal)),
            Err(_) if crate::sessions::gone(p.pid) => continue,
            Err(e) => return Err(e),
            Ok(other) => bail!("process {}: unexpected answer {other:?}", p.vpid),
        }
    }
    let mut plain: Vec<ProcessTable> = tables.iter().map(|(t, _)| t.clone()).collect();
    migrt::link::link_peers(&mut plain);
    for ((t, _), linked) in tables.iter_mut().zip(plain) {
        *t = linked;
    }
    Ok(tables)
}

pub fn text(live: &Live, journal: bool) -> Result<String> {
    Ok(crate::show::table_text(live, &fetch(live, journal)?))
}

pub fn json(live: &Live, journal: bool) -> Result<serde_json::Value> {
    Ok(crate::show::table_json(live, &fetch(live, journal)?))
}
