//! The binary's configuration errors, as a newcomer meets them: one line naming what is
//! wrong (the `.env` line, the variable), whatever `RUST_BACKTRACE` says.

use std::process::Command;

fn reservoir_in(dir: &std::path::Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reservoir"));
    cmd.arg("api").current_dir(dir).env("RUST_BACKTRACE", "1");
    for var in [
        "RESERVOIR_DATABASE_URL",
        "RESERVOIR_LISTEN",
        "RESERVOIR_EMAIL_FROM",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("the binary runs")
}

#[test]
fn a_bad_env_line_is_named_in_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join(".env"),
        "RESERVOIR_LOG_FORMAT=json\nRESERVOIR_EMAIL_FROM=Reservoir <billing@x.localhost>\n",
    )?;
    let out = reservoir_in(dir.path(), &[]);
    let stderr = String::from_utf8(out.stderr)?;
    assert!(!out.status.success());
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no backtrace: {stderr}"
    );
    assert!(stderr.contains(".env line 2"), "{stderr}");
    Ok(())
}

#[test]
fn a_bad_variable_is_named_in_one_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let out = reservoir_in(dir.path(), &[("RESERVOIR_LISTEN", "nope")]);
    let stderr = String::from_utf8(out.stderr)?;
    assert!(!out.status.success());
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line, no backtrace: {stderr}"
    );
    assert!(stderr.contains("RESERVOIR_LISTEN"), "{stderr}");
    Ok(())
}
