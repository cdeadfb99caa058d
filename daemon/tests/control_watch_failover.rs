//! A watch survives the loss of the member serving it: three `basaltd
//! control` processes on loopback, a typed client's watch of images served
//! by the leader, a writer creating images through every member. The
//! leader is killed (`kill -9`) mid-stream; the watch goes on from another
//! member and, in the end, has given every image the cluster holds
//! (a linearizable list) exactly once, in version order, including those
//! written after the kill — no gap, no duplicate, no error to the caller.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use basalt_api::{
    AdminClient, Image, ImageFormat, ImageSpec, Kind, Object, ObjectMeta, WatchEvent,
};
use basalt_testkit::{Prefix, wait};
use futures::StreamExt;

mod control_trio;

const DEADLINE: Duration = Duration::from_secs(60);
/// Images written before the kill, and acknowledged after it.
const BEFORE: usize = 20;
const AFTER: usize = 20;

fn image(name: &str) -> Object {
    Object::Image(Image {
        meta: ObjectMeta::named(name),
        spec: ImageSpec {
            source: "/var/lib/basalt/images/watched.raw".into(),
            format: ImageFormat::Raw,
        },
        ..Image::default()
    })
}

/// The names of the images the cluster holds (a linearizable list) whose
/// version is past `from`.
async fn images_after(client: &AdminClient, from: u64) -> BTreeSet<String> {
    let listed = client.list(Kind::Image).await.expect("list images");
    listed
        .objects
        .iter()
        .filter(|o| o.meta().resource_version > from)
        .map(|o| o.name().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_goes_on_from_another_member_when_its_member_dies() {
    let prefix = Prefix::for_test().expect("prefix");
    let control_trio::Trio {
        addresses,
        mut processes,
    } = control_trio::start(&prefix);
    let all = AdminClient::connect_lazy(&addresses.join(",")).expect("a client of every member");
    let started = std::time::Instant::now();
    let leader = loop {
        if let Some((3, Some(id))) = control_trio::members(&all).await {
            break id;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "three voters and a leader within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader = usize::try_from(leader).expect("an id") - 1;

    // The watch's client lists the leader first: the stream is served there.
    let mut order = vec![addresses[leader].clone()];
    order.extend(
        addresses
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != leader)
            .map(|(_, a)| a.clone()),
    );
    let watcher = AdminClient::connect(&order.join(","))
        .await
        .expect("a client of the leader first");
    let start = all.create(image("start")).await.expect("first image");
    let from = start.meta().resource_version;
    let mut events = watcher
        .watch(Some(Kind::Image), from)
        .await
        .expect("watch images");

    // The watch's events, collected as they come.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, u64)>::new()));
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let reader = {
        let seen = Arc::clone(&seen);
        let failure = Arc::clone(&failure);
        tokio::spawn(async move {
            while let Some(event) = events.next().await {
                match event {
                    Ok(WatchEvent::Added {
                        object,
                        resource_version,
                    }) => seen
                        .lock()
                        .unwrap()
                        .push((object.name().to_owned(), resource_version)),
                    Ok(other) => {
                        *failure.lock().unwrap() = Some(format!("unexpected event {other:?}"));
                        return;
                    }
                    Err(err) => {
                        *failure.lock().unwrap() = Some(format!("the watch failed: {err}"));
                        return;
                    }
                }
            }
            *failure.lock().unwrap() = Some("the watch ended".into());
        })
    };

    // A writer through every member; a write whose outcome is unknown
    // (the leader died under it) is not retried: the list tells.
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let writer = {
        let all = all.clone();
        let acknowledged = Arc::clone(&acknowledged);
        tokio::spawn(async move {
            for n in 0.. {
                if all.create(image(&format!("w-{n:04}"))).await.is_ok() {
                    acknowledged.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait::until("writes before the kill", DEADLINE, &[], || async {
        acknowledged.load(Ordering::Relaxed) >= BEFORE
    })
    .await;
    wait::until("the watch gives them", DEADLINE, &[], || async {
        seen.lock().unwrap().len() >= BEFORE / 2
    })
    .await;
    processes[leader]
        .kill9()
        .expect("kill -9 the member serving the watch");
    let seen_at_kill = seen.lock().unwrap().len();
    let acknowledged_at_kill = acknowledged.load(Ordering::Relaxed);
    wait::until(
        "writes acknowledged after the kill",
        DEADLINE,
        &[],
        || async { acknowledged.load(Ordering::Relaxed) >= acknowledged_at_kill + AFTER },
    )
    .await;
    writer.abort();
    let _ = writer.await;

    // What the cluster holds (linearizable), after the start image.
    let expected = images_after(&all, from).await;
    assert!(expected.len() >= BEFORE + AFTER, "{expected:?}");
    wait::until("the watch gives every image", DEADLINE, &[], || async {
        failure.lock().unwrap().is_some() || seen.lock().unwrap().len() >= expected.len()
    })
    .await;
    if let Some(failure) = failure.lock().unwrap().clone() {
        panic!("{failure}");
    }
    // A moment for anything extra (a duplicate) to arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    reader.abort();
    // Listed again: a write in flight when the writer was stopped may have
    // been committed after the first list (its caller gone, not the call).
    let expected = images_after(&all, from).await;
    let seen = seen.lock().unwrap().clone();
    let names: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
    let unique: BTreeSet<String> = names.iter().map(|n| (*n).to_owned()).collect();
    assert_eq!(unique.len(), seen.len(), "an image given twice: {names:?}");
    assert_eq!(unique, expected, "the watch's images equal the cluster's");
    assert!(
        seen.windows(2).all(|w| w[0].1 <= w[1].1),
        "in version order: {seen:?}"
    );
    assert!(
        seen.len() >= seen_at_kill + AFTER,
        "the watch went on after the kill ({seen_at_kill} before, {} in all)",
        seen.len()
    );
}
