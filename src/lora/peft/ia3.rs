//! (IA)³ folders (`peft_type: IA3`): which sites an adapter scales and on which side,
//! with PEFT's rules, and the `ia3_l` vectors read from its safetensors file.
//!
//! Semantics (PEFT's `ia3.layer.Linear.forward`): a module matched by
//! `feedforward_modules` computes `base(x * l)` (`l` is `[1, in]` in the file); any other
//! targeted module `base(x) * l` (`l` is `[out, 1]`). Module selection is LoRA's
//! (`target_modules`, `exclude_modules`); `feedforward_modules` matches a module when it
//! ends with an entry (plain `str.endswith`, no dot boundary) or, given as a string, when
//! it fully matches that regex.
//!
//! Invariants: every targeted site has exactly one finite vector of its side's width. An
//! input (feed-forward) scale may sit on any site, a stacked one (`up_proj` beside
//! `gate_proj`) included: the model runs that part's projection on the scaled input.
use super::config::{is_set, RawConfig};
use super::select::ModuleMatch;
use super::tensors::{finite, split_key, SafeTensors};
use super::AdapterError::{self, Invalid, Unsupported};
use super::{AdapterKind, AdapterWeights, BaseShape, LoraSite, SiteScale, CONFIG_FILE};
use regex::Regex;
use serde_json::Value;

/// Fields of an (IA)³ config that change what it computes and that we do not implement.
const REFUSED_FIELDS: [(&str, &str); 2] = [
    (
        "modules_to_save",
        "fully trained extra modules are not supported",
    ),
    (
        "fan_in_fan_out",
        "Conv1D (fan_in_fan_out) layouts are not supported",
    ),
];

/// How `feedforward_modules` matches module names.
enum FeedForward {
    Suffixes(Vec<String>),
    Regex(Regex),
}

/// The parts of an (IA)³ config that decide which vectors exist.
pub(super) struct Ia3Config {
    modules: ModuleMatch,
    feedforward: FeedForward,
}

/// Per (layer, site): None when untargeted, else whether it is feed-forward.
pub(super) type Ia3Plan = Vec<[Option<bool>; 7]>;

impl Ia3Config {
    pub(super) fn parse(raw: &RawConfig) -> Result<Ia3Config, AdapterError> {
        for (field, why) in REFUSED_FIELDS {
            if let Some(value) = raw.get(field).filter(|v| is_set(v)) {
                return Err(Unsupported(format!("{field} = {value} ({why})")));
            }
        }
        // PEFT's defaults for model_type "llama" when the fields are None.
        let modules = ModuleMatch::parse(raw, &["k_proj", "v_proj", "down_proj"], false)?;
        let feedforward = match raw.get("feedforward_modules") {
            None => FeedForward::Suffixes(vec!["down_proj".into()]),
            Some(Value::String(s)) => {
                FeedForward::Regex(Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    Unsupported(format!("config: feedforward_modules regex \"{s}\": {e}"))
                })?)
            }
            Some(Value::Array(items)) => FeedForward::Suffixes(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            Invalid(format!(
                                "config: feedforward_modules entries must be strings, not {v}"
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(Invalid(format!(
                    "config: feedforward_modules must be a list or a regex string, not {other}"
                )))
            }
        };
        Ok(Ia3Config {
            modules,
            feedforward,
        })
    }

    fn is_feedforward(&self, path: &str) -> bool {
        match &self.feedforward {
            FeedForward::Suffixes(entries) => entries.iter().any(|e| path.ends_with(e.as_str())),
            FeedForward::Regex(re) => re.is_match(path),
        }
    }

    /// Which sites are scaled, and on which side.
    pub(super) fn plan(&self, base: &BaseShape) -> Result<Ia3Plan, AdapterError> {
        let selected = self.modules.selected(base)?;
        let mut plan = Vec::with_capacity(selected.len());
        for (layer, sites) in selected.iter().enumerate() {
            let mut row = [None; 7];
            for site in LoraSite::ALL.into_iter().filter(|s| sites[s.index()]) {
                let path = base.module_path(site, layer);
                let feedforward = self.is_feedforward(&path);
                row[site.index()] = Some(feedforward);
            }
            plan.push(row);
        }
        Ok(plan)
    }
}

/// Builds the adapter's scales from `ia3_l` tensors, checked against the plan.
pub(super) fn assemble(
    plan: &Ia3Plan,
    file: &SafeTensors,
    base: &BaseShape,
) -> Result<AdapterWeights, AdapterError> {
    let mut scales: Vec<[Option<SiteScale>; 7]> = (0..base.num_layers)
        .map(|_| std::array::from_fn(|_| None))
        .collect();
    let mut bytes = 0;
    for t in &file.tensors {
        let unexpected = |why: &str| Invalid(format!("unexpected key {}{why}", t.name));
        let (layer, site, rest) =
            split_key(&t.name, base.num_layers).ok_or_else(|| unexpected(""))?;
        if !matches!(rest, "ia3_l" | "ia3_l.default") {
            return Err(unexpected(""));
        }
        let Some(feedforward) = plan[layer][site.index()] else {
            return Err(unexpected(&format!(
                " (layer {layer} {} is not targeted by {CONFIG_FILE})",
                site.module_name()
            )));
        };
        let (inp, out) = base.dims(site);
        let shape = if feedforward { [1, inp] } else { [out, 1] };
        let values = finite(&t.name, t.values(file, &shape)?)?;
        bytes += 4 * values.len();
        let scale = if feedforward {
            SiteScale::Input(values)
        } else {
            SiteScale::Output(values)
        };
        if scales[layer][site.index()].replace(scale).is_some() {
            return Err(Invalid(format!("duplicate tensor for key {}", t.name)));
        }
    }
    let mut names = Vec::new();
    for (layer, row) in plan.iter().enumerate() {
        for site in LoraSite::ALL
            .into_iter()
            .filter(|s| row[s.index()].is_some())
        {
            if scales[layer][site.index()].is_none() {
                let key = site.peft_name(layer, "ia3_l");
                return Err(Invalid(format!("missing key {key}")));
            }
            names.push(site.module_name().to_string());
        }
    }
    names.sort();
    names.dedup();
    Ok(AdapterWeights {
        target_modules: names,
        layers: (0..base.num_layers)
            .map(|_| std::array::from_fn(|_| None))
            .collect(),
        scales,
        bytes,
        ..AdapterWeights::empty(AdapterKind::Ia3)
    })
}
