//! What each subcommand does: read input, call the admin API, print.

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, Object, WatchEvent};
use futures::StreamExt as _;

use crate::Command;
use crate::output::{self, Format};

/// Runs one non-local command against the server at `server`.
pub async fn run(server: &str, format: Format, command: Command) -> anyhow::Result<()> {
    // Local input first: a bad file is reported even with no server.
    let objects = match &command {
        Command::Create { file } | Command::Replace { file } => read_objects(file)?,
        _ => Vec::new(),
    };
    let client = AdminClient::connect(server).await?;
    match command {
        Command::Get { kind, name } => {
            let object = client.get(kind, &name).await?;
            output::print_objects(format, kind, &[object])
        }
        Command::List { kind } => {
            let list = client.list(kind).await?;
            output::print_objects(format, kind, &list.objects)
        }
        Command::Create { .. } => {
            for object in objects {
                let what = describe(&object);
                let created = client
                    .create(object)
                    .await
                    .with_context(|| format!("creating {what}"))?;
                println!(
                    "{} created (resource version {})",
                    describe(&created),
                    created.meta().resource_version
                );
            }
            Ok(())
        }
        Command::Replace { .. } => {
            for mut object in objects {
                let what = describe(&object);
                if object.meta().resource_version == 0 {
                    // No version in the file: replace whatever is there now.
                    let current = client
                        .get(object.kind(), object.name())
                        .await
                        .with_context(|| format!("reading {what}"))?;
                    object.meta_mut().resource_version = current.meta().resource_version;
                }
                let updated = client
                    .update(object)
                    .await
                    .with_context(|| format!("replacing {what}"))?;
                println!(
                    "{} replaced (resource version {})",
                    describe(&updated),
                    updated.meta().resource_version
                );
            }
            Ok(())
        }
        Command::Delete {
            kind,
            name,
            resource_version,
            force,
        } => {
            if force {
                client.delete_forced(kind, &name, resource_version).await?;
            } else {
                client.delete(kind, &name, resource_version).await?;
            }
            println!("{kind}/{name} deleted");
            Ok(())
        }
        Command::Watch { kind, from, count } => {
            let mut events = client.watch(kind, from).await?;
            let mut seen = 0;
            while count.is_none_or(|count| seen < count) {
                let Some(event) = events.next().await else {
                    bail!("the server ended the watch")
                };
                print_event(format, &event?)?;
                seen += 1;
            }
            Ok(())
        }
        Command::Completion { .. } => bail!("`completion` is answered without a server"),
        Command::Cluster(_) => bail!("`cluster` commands are run by the cluster module"),
        Command::Token(_) => bail!("`token` commands are run by the token module"),
        Command::Policy(_) => bail!("`policy` commands are run by the policy module"),
        Command::Network(_) => bail!("`network` commands are run by the network module"),
        Command::Volume(_) => bail!("`volume` commands are run by the volume module"),
        Command::Image(_) => bail!("`image` commands are run by the image module"),
        Command::Node(_) | Command::Vm(_) => {
            bail!("`node` and `vm` commands are run by their own modules")
        }
    }
}

fn describe(object: &Object) -> String {
    format!("{}/{}", object.kind(), object.name())
}

fn print_event(format: Format, event: &WatchEvent) -> anyhow::Result<()> {
    let (verb, object) = match event {
        WatchEvent::Added { object, .. } => ("ADDED", object),
        WatchEvent::Modified { object, .. } => ("MODIFIED", object),
        WatchEvent::Deleted { object, .. } => ("DELETED", object),
        WatchEvent::Bookmark { resource_version } => {
            if format == Format::Table {
                println!("BOOKMARK {resource_version}");
            }
            return Ok(());
        }
    };
    match format {
        Format::Table => {
            println!(
                "{verb:<8} {:<24} rv={}",
                describe(object),
                event.resource_version()
            );
            Ok(())
        }
        Format::Json => output::print_json_line(event),
        Format::Yaml => output::print_yaml_document(event),
    }
}

/// Reads one or more objects from a YAML (or JSON, which is YAML) file, or
/// from stdin for `-`. Errors name the file and, for a stream, the document.
pub fn read_objects(path: &str) -> anyhow::Result<Vec<Object>> {
    let text = if path == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    };
    parse_objects(path, &text)
}

/// Parses a YAML stream of objects; each must have a `kind`.
pub fn parse_objects(path: &str, text: &str) -> anyhow::Result<Vec<Object>> {
    if text.trim().is_empty() {
        bail!("{path}: no object in the file");
    }
    let mut objects = Vec::new();
    for (index, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let object: Object = serde::Deserialize::deserialize(document)
            .with_context(|| format!("{path}: document {}", index + 1))?;
        object
            .validate()
            .with_context(|| format!("{path}: document {}", index + 1))?;
        objects.push(object);
    }
    if objects.is_empty() {
        bail!("{path}: no object in the file");
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_api::Kind;

    #[test]
    fn a_yaml_stream_gives_every_object() {
        let text = "kind: vm\nmeta: {name: web-1}\nspec: {cpus: 1, memory_mib: 64}\n---\nkind: vm\nmeta: {name: web-2}\nspec: {cpus: 2, memory_mib: 128}\n";
        let objects = parse_objects("f.yaml", text).unwrap();
        let names: Vec<_> = objects.iter().map(|o| o.name().to_owned()).collect();
        assert_eq!(names, ["web-1", "web-2"]);
        assert!(objects.iter().all(|o| o.kind() == Kind::Vm));
    }

    #[test]
    fn errors_name_the_file_the_document_and_the_field() {
        let text = "kind: vm\nmeta: {name: ok}\nspec: {cpus: 1, memory_mib: 64}\n---\nkind: vm\nmeta: {name: Bad_Name}\nspec: {cpus: 1, memory_mib: 64}\n";
        let err = format!("{:#}", parse_objects("f.yaml", text).unwrap_err());
        assert!(err.contains("f.yaml: document 2"), "{err}");
        assert!(err.contains("meta.name"), "{err}");

        let err = format!(
            "{:#}",
            parse_objects("g.yaml", "kind: spaceship\n").unwrap_err()
        );
        assert!(err.contains("g.yaml: document 1"), "{err}");
        assert!(err.contains("spaceship"), "{err}");

        let err = format!("{:#}", parse_objects("e.yaml", "").unwrap_err());
        assert!(err.contains("no object"), "{err}");
    }
}
