//! Environment overrides: `MACHINE_AGENT__SECTION__KEY=value` sets
//! `[section] key` in the parsed table before it is deserialized, so an
//! override is checked exactly like a value from the file. The source is a
//! trait, so tests pass a map and never touch the process environment.

use super::ConfigProblem;
use std::collections::BTreeMap;

/// Environment variables with this prefix override config fields; `__` separates
/// the section from the key: `MACHINE_AGENT__CONTROL_PLANE__URL=https://...`.
pub const ENV_PREFIX: &str = "MACHINE_AGENT__";

/// Where overrides come from: the process environment in production, a map in tests.
pub trait EnvSource {
    /// Every (name, value) pair whose name starts with [`ENV_PREFIX`].
    fn overrides(&self) -> Vec<(String, String)>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn overrides(&self) -> Vec<(String, String)> {
        std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn overrides(&self) -> Vec<(String, String)> {
        self.iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// `MACHINE_AGENT__SECTION__KEY=value` sets `[section] key`. The value is read as a
/// TOML value when it is one (numbers, booleans, arrays), else as a string.
pub(super) fn apply_env_overrides(table: &mut toml::Table, env: &dyn EnvSource, problems: &mut Vec<ConfigProblem>) {
    for (name, raw_value) in env.overrides() {
        let path: Vec<String> = name[ENV_PREFIX.len()..].split("__").map(|p| p.to_ascii_lowercase()).collect();
        let [section, key] = path.as_slice() else {
            problems.push(ConfigProblem { field: name.clone(), problem: format!("expected {ENV_PREFIX}<SECTION>__<KEY>") });
            continue;
        };
        let value =
            format!("v = {raw_value}").parse::<toml::Table>().ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| toml::Value::String(raw_value.clone()));
        let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
        match entry.as_table_mut() {
            Some(section_table) => {
                section_table.insert(key.clone(), value);
            }
            None => problems.push(ConfigProblem { field: name.clone(), problem: format!("[{section}] is not a table") }),
        }
    }
}
