//! `basalt image`: disk images that VM disks clone. `import` declares one
//! (a path present on the nodes, or an http(s) URL); each node that runs a
//! VM with a disk from it copies it into its pool once, with progress in
//! the image's status (`basalt image list`); `delete` removes the object,
//! and the nodes drop their copies (disks cloned from it keep their data).

use anyhow::{Context as _, bail};
use basalt_api::{AdminClient, Image, ImageFormat, ImageSpec, Kind, Object, ObjectMeta};

use crate::output::{self, Format};

/// What to do with images.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCommand {
    /// Declare an image to import from a path (on every node that needs
    /// it) or an http(s) URL.
    Import {
        /// The image's name (a DNS label).
        name: String,
        /// An absolute path (a relative one is made absolute here) or an
        /// `http://`/`https://` URL.
        #[arg(long)]
        source: String,
        /// The source's format.
        #[arg(long, value_enum, default_value_t = FormatArg::Raw)]
        format: FormatArg,
    },
    /// List images, with each node's import progress.
    #[command(visible_alias = "ls")]
    List,
    /// Delete an image (disks already cloned from it keep their data).
    Delete {
        /// The image's name.
        name: String,
    },
}

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FormatArg {
    /// A raw disk.
    Raw,
    /// QEMU's qcow2.
    Qcow2,
}

/// The source as stored: URLs as given, paths made absolute.
fn absolute_source(source: &str) -> anyhow::Result<String> {
    if source.starts_with("http://") || source.starts_with("https://") || source.starts_with('/') {
        return Ok(source.to_owned());
    }
    let cwd = std::env::current_dir().context("finding the current directory")?;
    Ok(cwd.join(source).to_string_lossy().into_owned())
}

/// Runs one `basalt image` command against the server at `server`.
pub async fn run(server: &str, format: Format, command: ImageCommand) -> anyhow::Result<()> {
    let client = AdminClient::connect(server).await?;
    match command {
        ImageCommand::Import {
            name,
            source,
            format: image_format,
        } => {
            let image = Image {
                meta: ObjectMeta::named(name),
                spec: ImageSpec {
                    source: absolute_source(&source)?,
                    format: match image_format {
                        FormatArg::Raw => ImageFormat::Raw,
                        FormatArg::Qcow2 => ImageFormat::Qcow2,
                    },
                },
                ..Image::default()
            };
            let object = Object::Image(image);
            object.validate()?;
            let created = client.create(object).await.context("creating the image")?;
            let Object::Image(image) = &created else {
                bail!(
                    "the server answered an image create with a {}",
                    created.kind()
                );
            };
            match format {
                Format::Table => {
                    println!(
                        "image/{} created from {} ({}); nodes import it when a VM disk needs it",
                        image.meta.name,
                        image.spec.source,
                        image.spec.format.as_str()
                    );
                    Ok(())
                }
                _ => output::print_objects(format, Kind::Image, std::slice::from_ref(&created)),
            }
        }
        ImageCommand::List => {
            let list = client.list(Kind::Image).await?;
            output::print_objects(format, Kind::Image, &list.objects)
        }
        ImageCommand::Delete { name } => {
            client
                .delete(Kind::Image, &name, None)
                .await
                .with_context(|| format!("deleting image/{name}"))?;
            println!("image/{name} deleted");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_become_absolute_unless_urls() {
        assert_eq!(absolute_source("/a/b.img").unwrap(), "/a/b.img");
        assert_eq!(
            absolute_source("https://example.invalid/x.qcow2").unwrap(),
            "https://example.invalid/x.qcow2"
        );
        assert!(absolute_source("b.img").unwrap().starts_with('/'));
    }
}
