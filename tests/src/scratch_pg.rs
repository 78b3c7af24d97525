//! A throwaway PostgreSQL cluster for tests that stop the database: `initdb` into a
//! temporary folder, `pg_ctl` on a free port. The shared server (`TEST_DATABASE_URL`)
//! is never touched, so stopping this one disturbs no other test.
//!
//! The binaries are found under `/usr/lib/postgresql/<version>/bin` (the newest
//! version), or in the folder `RESERVOIR_TEST_PG_BIN` names. PostgreSQL refuses to run
//! as root, so when the test runs as root every command runs as the `postgres` user
//! (through `runuser`) and the folder is handed to that user.

use anyhow::Context as _;
use std::path::{Path, PathBuf};
use std::process::Command;

pub struct ScratchPg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
}

impl ScratchPg {
    /// Creates the cluster and starts it (blocking: call it from `spawn_blocking`, or
    /// before the load starts).
    pub fn start() -> anyhow::Result<Self> {
        let bin = binaries()?;
        let as_postgres = running_as_root()?;
        let dir = tempfile::Builder::new().prefix("scratch-pg-").tempdir()?;
        if as_postgres {
            run(Command::new("chown")
                .arg("-R")
                .arg("postgres")
                .arg(dir.path()))?;
        }
        let port = free_port()?;
        let mut pg = Self {
            dir,
            bin,
            port,
            as_postgres,
            running: false,
        };
        let data = pg.data_dir();
        pg.run_pg(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )
        .context("initdb")?;
        pg.start_again()?;
        Ok(pg)
    }

    /// The URL of the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server the way an operator's restart does (`pg_ctl stop -m fast`:
    /// open sessions are terminated with 57P01), and waits until it is gone.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run_pg("pg_ctl", &["-D", &data, "-m", "fast", "-w", "stop"])
            .context("pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Starts the (stopped) server again on the same port, and waits until it accepts
    /// connections.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.path().join("server.log");
        // fsync off: the cluster dies with the test, and the machine is shared.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                &data,
                "-l",
                &log.display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .with_context(|| {
            format!(
                "pg_ctl start; server log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        self.running = true;
        Ok(())
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run_pg(&self, program: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(&program);
            cmd
        } else {
            Command::new(&program)
        };
        cmd.args(args).current_dir(self.dir.path());
        run(&mut cmd)
    }
}

impl Drop for ScratchPg {
    fn drop(&mut self) {
        if self.running {
            let data = self.data_dir();
            let _ = self.run_pg("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]);
        }
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{cmd:?} exited with {}:\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`.
fn binaries() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("RESERVOIR_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (set RESERVOIR_TEST_PG_BIN)")?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            Path::new(&bin.join("pg_ctl"))
                .is_file()
                .then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| anyhow::anyhow!("no PostgreSQL under /usr/lib/postgresql"))
}

fn running_as_root() -> anyhow::Result<bool> {
    let output = Command::new("id").arg("-u").output().context("id -u")?;
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A port nobody listens on now (the OS picks it; the listener is closed at once).
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
