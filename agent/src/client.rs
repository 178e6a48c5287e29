//! Talking to a shim process over its control socket.

use anyhow::{Context, Result, bail};
use migrt::paths::SessionDir;
use migrt::wire::{self, Request, Response};
use std::os::unix::net::UnixStream;
use std::time::Duration;

pub struct Client {
    stream: UnixStream,
    vpid: i32,
}

impl Client {
    pub fn connect(dir: &SessionDir, vpid: i32) -> Result<Client> {
        let path = dir.ctl(vpid);
        let stream = UnixStream::connect(&path).with_context(|| {
            format!(
                "cannot reach process {vpid} of session {} at {} (has it exited?)",
                dir.name(),
                path.display()
            )
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(Client { stream, vpid })
    }

    pub fn call(&mut self, req: &Request) -> Result<Response> {
        wire::write_frame(&mut self.stream, req)?;
        let resp: Response = wire::read_frame(&mut self.stream)
            .with_context(|| format!("no answer from process {}", self.vpid))?;
        if let Response::Error(e) = &resp {
            bail!("process {}: {e}", self.vpid);
        }
        Ok(resp)
    }
}
