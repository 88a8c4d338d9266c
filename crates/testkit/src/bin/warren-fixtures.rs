//! `./dev fixtures`: makes every fixture the tests read, in the host's network namespace, before
//! any test runs. Each one that fails is tried again (a mirror's hiccup); one that still fails
//! stops the run with what went wrong.
#![allow(clippy::print_stderr)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use warren_testkit::{Fixture, fixtures_dir};

/// Waits before the second and third attempts.
const RETRY_WAITS: [Duration; 2] = [Duration::from_secs(10), Duration::from_secs(30)];

fn prepare_with_retries(fixture: Fixture) -> Result<(), String> {
    let name = fixture.name();
    if fixture != Fixture::StaticGuest && fixture.is_ready() {
        eprintln!("fixture {name}: ready");
        return Ok(());
    }
    eprintln!("fixture {name}: making it");
    let started = Instant::now();
    let mut waits = RETRY_WAITS.iter();
    loop {
        match fixture.prepare() {
            Ok(()) => {
                eprintln!(
                    "fixture {name}: made in {:.0} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(());
            }
            Err(e) => match waits.next() {
                Some(wait) => {
                    eprintln!(
                        "fixture {name}: {e}\n  trying again in {} s",
                        wait.as_secs()
                    );
                    std::thread::sleep(*wait);
                }
                None => {
                    return Err(format!(
                        "cannot make the test fixture {name} ({} attempts): {e}",
                        RETRY_WAITS.len() + 1
                    ));
                }
            },
        }
    }
}

fn main() -> ExitCode {
    eprintln!("test fixtures in {}", fixtures_dir().display());
    // One maker at a time per folder (two checkouts share /var/cache/warren/fixtures).
    let lock_path = fixtures_dir().join(".lock");
    let lock = std::fs::create_dir_all(fixtures_dir())
        .and_then(|()| std::fs::File::create(&lock_path))
        .and_then(|f| f.lock().map(|()| f));
    let _lock = match lock {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: cannot lock {}: {e}", lock_path.display());
            return ExitCode::FAILURE;
        }
    };
    // Downloads and bootstraps run side by side (they mostly wait on the mirror); the guest is
    // a build, which has both cores to itself after them.
    let (builds, downloads): (Vec<Fixture>, Vec<Fixture>) = Fixture::all()
        .into_iter()
        .partition(|f| *f == Fixture::StaticGuest);
    let mut failures: Vec<String> = std::thread::scope(|s| {
        let running: Vec<_> = downloads
            .into_iter()
            .map(|f| s.spawn(move || prepare_with_retries(f)))
            .collect();
        running
            .into_iter()
            .filter_map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a fixture thread panicked".into()))
                    .err()
            })
            .collect()
    });
    failures.extend(
        builds
            .into_iter()
            .filter_map(|f| prepare_with_retries(f).err()),
    );
    if failures.is_empty() {
        return ExitCode::SUCCESS;
    }
    for failure in &failures {
        eprintln!("error: {failure}");
    }
    eprintln!(
        "the tests cannot run without their fixtures: check that Debian's mirror is reachable \
         (WARREN_DEBIAN_MIRROR, default http://deb.debian.org/debian), then run `./dev fixtures` again"
    );
    ExitCode::FAILURE
}
