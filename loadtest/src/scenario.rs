//! Load scenarios as data (`scenarios.toml`): weighted flows of request templates.

use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub scenario: BTreeMap<String, Scenario>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub description: String,
    /// How many distinct machines `{known}` cycles through.
    #[serde(default = "one")]
    pub known_machines: u64,
    pub flows: Vec<Flow>,
}

fn one() -> u64 {
    1
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flow {
    pub weight: u32,
    pub steps: Vec<Step>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub path: String,
    pub form: String,
}

/// The values templates are filled with.
#[derive(Clone, Debug)]
pub struct Vars {
    pub token: String,
    pub product: i64,
    /// `{key}` is `keys[{known} % keys.len()]`: machine `known-7` always uses the same key, and
    /// the machines spread evenly over the keys.
    pub keys: Vec<String>,
    pub run: String,
}

impl Vars {
    /// The values for one round of a comparison: its own `{run}` tag per round and target, so
    /// that a `new-{run}-{seq}` machine is new in every round, not a re-activation from the
    /// round before.
    pub fn for_round(&self, round: u32, target: char) -> Vars {
        Vars {
            run: format!("{}-{round}{target}", self.run),
            ..self.clone()
        }
    }
}

pub fn load(text: &str) -> anyhow::Result<ScenarioFile> {
    let f: ScenarioFile = toml::from_str(text)?;
    for (name, s) in &f.scenario {
        anyhow::ensure!(!s.flows.is_empty(), "scenario {name} has no flows");
        anyhow::ensure!(
            s.known_machines > 0,
            "scenario {name}: known_machines must be > 0"
        );
        for fl in &s.flows {
            anyhow::ensure!(
                fl.weight > 0 && !fl.steps.is_empty(),
                "scenario {name}: empty flow"
            );
        }
    }
    Ok(f)
}

impl Scenario {
    /// The flow for iteration `seq`: a deterministic weighted pick (a multiplicative hash of
    /// `seq`), so runs are repeatable and workers need no shared random state.
    pub fn flow(&self, seq: u64) -> &Flow {
        let total: u64 = self.flows.iter().map(|f| u64::from(f.weight)).sum();
        let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29) % total;
        for f in &self.flows {
            let w = u64::from(f.weight);
            if x < w {
                return f;
            }
            x -= w;
        }
        &self.flows[0]
    }
}

/// Fills `{token}`, `{product}`, `{key}`, `{run}`, `{seq}` and `{known}`.
pub fn render(template: &str, v: &Vars, seq: u64, known_machines: u64) -> String {
    let known = seq % known_machines;
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            break;
        };
        let name = &rest[i + 1..i + j];
        match name {
            "token" => out.push_str(&v.token),
            "product" => out.push_str(&v.product.to_string()),
            "key" => {
                let i = (known % v.keys.len().max(1) as u64) as usize;
                out.push_str(v.keys.get(i).map_or("", String::as_str));
            }
            "run" => out.push_str(&v.run),
            "seq" => out.push_str(&seq.to_string()),
            "known" => out.push_str(&known.to_string()),
            other => {
                out.push('{');
                out.push_str(other);
                out.push('}');
            }
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_scenarios_load_and_render() {
        let f = load(include_str!("../scenarios.toml")).unwrap();
        for name in [
            "reactivate",
            "new-machines",
            "unknown-key",
            "floating",
            "deactivate",
            "mix",
        ] {
            assert!(f.scenario.contains_key(name), "{name}");
        }
        let v = Vars {
            token: "T".into(),
            product: 3,
            keys: vec!["K0".into(), "K1".into()],
            run: "r1".into(),
        };
        let s = &f.scenario["reactivate"];
        let form = render(&s.flows[0].steps[0].form, &v, 1234, s.known_machines);
        assert!(
            form.starts_with("token=T&ProductId=3&key=K0&MachineCode=known-234&"),
            "{form}"
        );
        let form = render(&s.flows[0].steps[0].form, &v, 1235, s.known_machines);
        assert!(
            form.starts_with("token=T&ProductId=3&key=K1&MachineCode=known-235&"),
            "{form}"
        );
        assert_eq!(render("{seq}-{run}-{nope}", &v, 7, 1), "7-r1-{nope}");
        // Each round of a comparison, and each target in it, has new machines of its own.
        let new = &f.scenario["new-machines"].flows[0].steps[0].form;
        let codes: std::collections::HashSet<String> = [(0, 'a'), (0, 'b'), (1, 'a'), (1, 'b')]
            .iter()
            .map(|&(r, t)| render(new, &v.for_round(r, t), 7, 1))
            .collect();
        assert_eq!(codes.len(), 4);
    }

    #[test]
    fn flows_are_picked_by_weight() {
        let f = load(include_str!("../scenarios.toml")).unwrap();
        let mix = &f.scenario["mix"];
        let n = 100_000;
        let reactivations = (0..n).filter(|s| mix.flow(*s).weight == 80).count();
        let share = reactivations as f64 / n as f64;
        assert!((0.78..0.82).contains(&share), "{share}");
    }
}
