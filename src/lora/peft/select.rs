//! Which modules a PEFT config selects, with PEFT's rules
//! (`check_target_module_exists`): `target_modules` as names, a regex or `all-linear`,
//! `exclude_modules`, and `layers_to_transform`/`layers_pattern`; shared by every method.
//! Invariant: a listed target that names no Llama linear site is an error (the
//! embeddings and the head by name, as unsupported).
use super::config::{compile, is_set, RawConfig};
use super::AdapterError::{self, Invalid, Unsupported};
use super::{BaseShape, LoraSite};
use regex::Regex;
use serde_json::Value;

/// How `target_modules` / `exclude_modules` select module names (PEFT's
/// `check_target_module_exists`).
enum Selector {
    /// A name matches if it equals an entry or ends with `"." + entry`.
    Names(Vec<String>),
    /// `re.fullmatch` against the whole module name.
    Regex(String, Regex),
    /// The `"all-linear"` shorthand: every linear layer but the output head.
    AllLinear,
}

impl Selector {
    fn parse(field: &str, value: &Value) -> Result<Selector, AdapterError> {
        match value {
            Value::String(s) if field == "target_modules" && s.to_lowercase() == "all-linear" => {
                Ok(Selector::AllLinear)
            }
            Value::String(s) => Ok(Selector::Regex(
                s.clone(),
                compile(field, s, &format!("^(?:{s})$"))?,
            )),
            Value::Array(items) => Ok(Selector::Names(strings(field, items)?)),
            other => Err(Invalid(format!(
                "config: {field} must be a list of module names or a regex string, not {other}"
            ))),
        }
    }

    /// Matching without the layer filter (which PEFT applies to the suffix case only).
    fn matches(&self, path: &str) -> bool {
        match self {
            Selector::Names(names) => names.iter().any(|n| n == path || ends_with_dotted(path, n)),
            Selector::Regex(_, re) => re.is_match(path),
            Selector::AllLinear => true,
        }
    }
}

fn ends_with_dotted(path: &str, name: &str) -> bool {
    path.len() > name.len()
        && path.ends_with(name)
        && path[..path.len() - name.len()].ends_with('.')
}

/// `layers_to_transform` with `layers_pattern`.
struct LayerFilter {
    indexes: Vec<usize>,
    /// Compiled `re.match(rf".*\.{pattern}\.(\d+)\.")` per `layers_pattern` entry, or
    /// PEFT's default `r".*\.[^.]*\.(\d+)\."` when there is none.
    patterns: Vec<Regex>,
}

impl LayerFilter {
    fn accepts(&self, path: &str) -> bool {
        let capture = |re: &Regex| re.captures(path)?.get(1)?.as_str().parse::<usize>().ok();
        self.patterns
            .iter()
            .find_map(capture)
            .is_some_and(|i| self.indexes.contains(&i))
    }
}

/// Which module names a config selects: `target_modules`, `exclude_modules` and
/// `layers_to_transform`/`layers_pattern`, with PEFT's rules (shared by every method).
pub(super) struct ModuleMatch {
    targets: Selector,
    exclude: Option<Selector>,
    layers: Option<LayerFilter>,
}

impl ModuleMatch {
    /// `target_modules` (PEFT's default for Llama, `default_targets`, when absent),
    /// `exclude_modules` and, if `with_layers`, the layer filter.
    pub(super) fn parse(
        raw: &RawConfig,
        default_targets: &[&str],
        with_layers: bool,
    ) -> Result<ModuleMatch, AdapterError> {
        let targets = match raw.get("target_modules") {
            None => Selector::Names(default_targets.iter().map(|s| s.to_string()).collect()),
            Some(v) => Selector::parse("target_modules", v)?,
        };
        let exclude = match raw.get("exclude_modules") {
            Some(v) if is_set(v) => Some(Selector::parse("exclude_modules", v)?),
            _ => None,
        };
        let layers = if with_layers {
            layer_filter(raw, &targets)?
        } else {
            None
        };
        Ok(ModuleMatch {
            targets,
            exclude,
            layers,
        })
    }

    /// `selects` for every (layer, site) of the base: `[layer][site.index()]`; an error
    /// when a listed target is unknown or nothing is selected.
    pub(super) fn selected(&self, base: &BaseShape) -> Result<Vec<[bool; 7]>, AdapterError> {
        self.check_known_targets(base)?;
        let selected: Vec<[bool; 7]> = (0..base.num_layers)
            .map(|layer| {
                std::array::from_fn(|i| self.selects(&base.module_path(LoraSite::ALL[i], layer)))
            })
            .collect();
        if !selected.iter().flatten().any(|&s| s) {
            return Err(Invalid(
                "config: target_modules selects no linear module of the base model".into(),
            ));
        }
        Ok(selected)
    }

    /// PEFT's `check_target_module_exists` for one module name.
    pub(super) fn selects(&self, path: &str) -> bool {
        if self.exclude.as_ref().is_some_and(|e| e.matches(path)) {
            return false;
        }
        match &self.targets {
            Selector::Names(names) if names.iter().any(|n| n == path) => true,
            Selector::Names(_) => {
                self.targets.matches(path) && self.layers.as_ref().is_none_or(|f| f.accepts(path))
            }
            other => other.matches(path),
        }
    }

    /// Every listed target must name a Llama linear site; a regex must not reach the
    /// embeddings or the head.
    fn check_known_targets(&self, base: &BaseShape) -> Result<(), AdapterError> {
        let embedding = |name: &str| {
            let last = name.rsplit('.').next().unwrap_or(name);
            last == "embed_tokens" || last == "lm_head"
        };
        match &self.targets {
            Selector::Names(names) => {
                for name in names {
                    let known = (0..base.num_layers.max(1)).any(|layer| {
                        LoraSite::ALL.iter().any(|s| {
                            let path = base.module_path(*s, layer);
                            path == *name || ends_with_dotted(&path, name)
                        })
                    });
                    if known {
                        continue;
                    }
                    if embedding(name) {
                        return Err(Unsupported(format!(
                            "embedding/lm_head LoRA (target_modules entry \"{name}\")"
                        )));
                    }
                    return Err(Invalid(format!("unknown target module {name}")));
                }
            }
            Selector::Regex(source, re) => {
                if re.is_match("lm_head") || re.is_match("model.embed_tokens") {
                    return Err(Unsupported(format!(
                        "embedding/lm_head LoRA (target_modules regex \"{source}\" selects them)"
                    )));
                }
            }
            Selector::AllLinear => {}
        }
        Ok(())
    }
}

fn layer_filter(raw: &RawConfig, targets: &Selector) -> Result<Option<LayerFilter>, AdapterError> {
    let to_transform = raw.get("layers_to_transform");
    let pattern = raw.get("layers_pattern");
    if matches!(targets, Selector::Regex(..) | Selector::AllLinear) {
        for (field, value) in [
            ("layers_to_transform", to_transform),
            ("layers_pattern", pattern),
        ] {
            if value.is_some() {
                return Err(Invalid(format!(
                    "config: {field} cannot be used when target_modules is a string"
                )));
            }
        }
    }
    if pattern.is_some_and(is_set) && !to_transform.is_some_and(is_set) {
        return Err(Invalid(
            "config: layers_pattern requires layers_to_transform".into(),
        ));
    }
    let indexes = match to_transform {
        None => return Ok(None),
        Some(Value::Array(items)) if items.is_empty() => return Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| index("layers_to_transform", v))
            .collect::<Result<_, _>>()?,
        Some(v) => vec![index("layers_to_transform", v)?],
    };
    let names = match pattern {
        None => Vec::new(),
        Some(Value::Array(items)) => strings("layers_pattern", items)?,
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(other) => {
            return Err(Invalid(format!(
                "config: layers_pattern must be a string or a list, not {other}"
            )))
        }
    };
    let patterns = if names.is_empty() {
        vec![compile("layers_pattern", "", r"^.*\.[^.]*\.(\d+)\.")?]
    } else {
        let compiled = names
            .iter()
            .map(|p| compile("layers_pattern", p, &format!(r"^.*\.{p}\.(\d+)\.")));
        compiled.collect::<Result<_, _>>()?
    };
    Ok(Some(LayerFilter { indexes, patterns }))
}

fn strings(field: &str, items: &[Value]) -> Result<Vec<String>, AdapterError> {
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(Invalid(format!(
                "config: {field} entries must be strings, not {other}"
            ))),
        })
        .collect()
}

fn index(field: &str, value: &Value) -> Result<usize, AdapterError> {
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| {
            Invalid(format!(
                "config: {field} must hold layer indexes, not {value}"
            ))
        })
}
