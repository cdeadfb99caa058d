//! Printing objects as a table (for people) or JSON/YAML (for scripts).

use basalt_api::{Kind, Object};
use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns, one object per row.
    Table,
    /// JSON: one object, or an array for lists.
    Json,
    /// YAML: one document per object.
    Yaml,
}

/// Prints `objects` (all of `kind`).
pub fn print_objects(format: Format, kind: Kind, objects: &[Object]) -> anyhow::Result<()> {
    match format {
        Format::Table => {
            print!("{}", table(kind, objects));
            Ok(())
        }
        Format::Json if objects.len() == 1 => print_json(&objects[0]),
        Format::Json => print_json(&objects),
        Format::Yaml => objects.iter().try_for_each(print_yaml_document),
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// One JSON value on one line (for streams).
pub fn print_json_line(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// One YAML document, with its `---` separator.
pub fn print_yaml_document(value: &impl Serialize) -> anyhow::Result<()> {
    print!("---\n{}", serde_norway::to_string(value)?);
    Ok(())
}

/// The columns for `kind`: name first, then what an operator scans for.
fn headers(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Node => &["NAME", "ADDRESS", "READY", "CORDONED", "CPUS", "MEMORY MiB"],
        Kind::Vm => &["NAME", "PHASE", "NODE", "CPUS", "MEMORY MiB", "RUNNING"],
        Kind::Placement => &["NAME", "VM", "NODE", "EPOCH", "REPLICA NODES"],
        Kind::Token => &["NAME", "USES", "MAX USES", "EXPIRES IN", "REVOKED"],
        Kind::Member => &["NAME", "ID", "ADDRESS", "VOTER", "LEADER"],
        Kind::Network => &["NAME", "CIDR", "VNI", "ROUTING"],
        Kind::Policy => &["NAME", "SELECTOR", "INGRESS", "EGRESS"],
        Kind::Endpoint => &[
            "NAME", "IP", "MAC", "VM", "NIC", "NODE", "EPOCH", "IDENTITY", "STATE",
        ],
        Kind::Migration => &["NAME", "PHASE", "SOURCE", "TARGET", "REMAINING", "MESSAGE"],
        Kind::Image => &["NAME", "FORMAT", "SIZE", "NODES", "SOURCE"],
        Kind::Volume => crate::volume_cluster::HEADERS,
    }
}

fn row(object: &Object) -> Vec<String> {
    match object {
        Object::Node(n) => vec![
            n.meta.name.clone(),
            n.spec.address.clone(),
            yes_no(n.status.is_ready()),
            yes_no(n.spec.cordoned),
            n.status.capacity.cpus.to_string(),
            n.status.capacity.memory_mib.to_string(),
        ],
        Object::Vm(v) => vec![
            v.meta.name.clone(),
            format!("{:?}", v.status.phase),
            v.status.node.clone().unwrap_or_else(|| "-".into()),
            v.spec.cpus.to_string(),
            v.spec.memory_mib.to_string(),
            yes_no(v.spec.running),
        ],
        Object::Placement(p) => vec![
            p.meta.name.clone(),
            p.vm.clone(),
            p.node.clone(),
            p.epoch.to_string(),
            if p.replica_nodes.is_empty() {
                "-".to_owned()
            } else {
                p.replica_nodes.join(",")
            },
        ],
        Object::Token(t) => vec![
            t.meta.name.clone(),
            t.status.uses.to_string(),
            t.spec.max_uses.to_string(),
            expires_in(t.status.expires_at_unix_ms),
            yes_no(t.spec.revoked),
        ],
        Object::Member(m) => vec![
            m.meta.name.clone(),
            m.id.to_string(),
            m.address.clone(),
            yes_no(m.voter),
            yes_no(m.leader),
        ],
        Object::Network(n) => vec![
            n.meta.name.clone(),
            n.spec.cidr.clone(),
            n.spec.vni.to_string(),
            crate::network::routing_text(n.spec.routing).to_owned(),
        ],
        Object::Policy(p) => vec![
            p.meta.name.clone(),
            crate::policy::selector_text(&p.spec.selector),
            crate::policy::rules_text(p.spec.ingress.as_deref()),
            crate::policy::rules_text(p.spec.egress.as_deref()),
        ],
        Object::Endpoint(e) => vec![
            e.meta.name.clone(),
            e.ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
            e.mac.clone(),
            e.vm.clone(),
            e.nic.to_string(),
            if e.node.is_empty() {
                "-".into()
            } else {
                e.node.clone()
            },
            e.epoch.to_string(),
            e.identity.to_string(),
            if e.release_at_unix_ms == 0 {
                "leased".into()
            } else {
                format!("released, free in {}", expires_in(e.release_at_unix_ms))
            },
        ],
        Object::Migration(m) => vec![
            m.meta.name.clone(),
            m.status.phase.to_string(),
            dash(&m.status.source),
            dash(if m.status.target.is_empty() {
                m.spec.target.as_deref().unwrap_or_default()
            } else {
                &m.status.target
            }),
            format!("{} MiB", m.status.data_remaining >> 20),
            dash(&m.status.message),
        ],
        Object::Image(i) => vec![
            i.meta.name.clone(),
            i.spec.format.as_str().to_owned(),
            format!("{} MiB", i.status.size_bytes >> 20),
            image_nodes(&i.status),
            i.spec.source.clone(),
        ],
        Object::Volume(v) => crate::volume_cluster::row(v),
    }
}

/// `text`, or "-" when empty.
fn dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

/// How long until `at` (Unix ms), or "expired".
fn expires_in(at: u64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    if at <= now {
        return "expired".into();
    }
    let seconds = (at - now) / 1000;
    match seconds {
        0..120 => format!("{seconds}s"),
        120..7_200 => format!("{}m", seconds / 60),
        7_200..172_800 => format!("{}h", seconds / 3_600),
        _ => format!("{}d", seconds / 86_400),
    }
}

fn yes_no(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// Renders the table; an empty list says so instead of printing headers.
pub fn table(kind: Kind, objects: &[Object]) -> String {
    if objects.is_empty() {
        return format!("no {kind} objects\n");
    }
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_header(headers(kind).iter().copied());
    for object in objects {
        table.add_row(row(object));
    }
    format!("{table}\n")
}

/// Per node: `n1 ready`, `n2 importing 40%`, `n3 failed`.
fn image_nodes(status: &basalt_api::ImageStatus) -> String {
    if status.nodes.is_empty() {
        return "-".into();
    }
    let nodes: Vec<String> = status
        .nodes
        .iter()
        .map(|n| match n.phase {
            basalt_api::ImagePhase::Ready => format!("{} ready", n.node),
            basalt_api::ImagePhase::Failed => format!("{} failed", n.node),
            basalt_api::ImagePhase::Importing => format!(
                "{} importing {}%",
                n.node,
                (n.bytes_done * 100).checked_div(n.bytes_total).unwrap_or(0)
            ),
        })
        .collect();
    nodes.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::{ObjectMeta, Placement};

    #[test]
    fn a_table_has_one_row_per_object_under_the_kind_headers() {
        let placements: Vec<Object> = ["a", "b"]
            .into_iter()
            .map(|name| {
                Object::Placement(Placement {
                    meta: ObjectMeta::named(name),
                    vm: format!("vm-{name}"),
                    node: "n1".into(),
                    epoch: 7,
                    replica_nodes: Vec::new(),
                })
            })
            .collect();
        let text = table(Kind::Placement, &placements);
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("EPOCH"), "{text}");
        assert!(
            lines[2].contains("vm-b") && lines[2].contains('7'),
            "{text}"
        );
        assert_eq!(table(Kind::Vm, &[]), "no vm objects\n");
    }
}
