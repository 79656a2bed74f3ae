//! The Kafka log against a real broker (tansu 0.6.0 on sqlite, see tests/tansu.sh): the same
//! semantics the embedded log's tests pin down, plus what only a cluster has (several members in
//! a group, a broker crash).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{expect_nothing, read_n, unique, Broker};
use streamledger_embedded::log::EmbeddedLog;
use streamledger_kafka::topics::{self, Status};
use streamledger_kafka::KafkaLog;
use streamledger_ports::log::{partition_for, Log, OutRecord, Record, Subscription};
use streamledger_ports::topics::{TopicSpec, Topics};

/// A topic spec as topics.toml would give it (history kept forever, never compacted).
fn spec(name: &str, partitions: i32) -> TopicSpec {
    let configs = [("retention.ms", "-1"), ("cleanup.policy", "delete"), ("min.insync.replicas", "1")];
    TopicSpec {
        name: name.into(),
        suffix: name.into(),
        partitions,
        replication: 1,
        configs: configs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

async fn topic(log: &KafkaLog, partitions: i32) -> String {
    let name = unique("t");
    log.ensure_topic(&spec(&name, partitions)).await.expect("ensure_topic");
    name
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_keys_values_and_explicit_partitions() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 3).await;
    let before = now_ms();
    let sent = vec![
        OutRecord::keyed("k1", b"v1".to_vec()),
        OutRecord::unkeyed(b"no key".to_vec()),
        OutRecord { key: Some(b"k2".to_vec()), value: b"explicit".to_vec(), partition: Some(2) },
        OutRecord::keyed("", b"empty key".to_vec()),
        OutRecord { key: None, value: Vec::new(), partition: Some(1) },
    ];
    let placed = log.append(&t, sent.clone()).await.unwrap();
    let expected_partitions = [partition_for(b"k1", 3), 0, 2, partition_for(b"", 3), 1];
    assert_eq!(placed.iter().map(|(p, _)| *p).collect::<Vec<_>>(), expected_partitions);

    // Read every partition back from offset 0 and match each record by where it was placed.
    let positions = (0..3).map(|p| (t.clone(), p, 0)).collect();
    let mut c = log.consumer(Subscription::Assign { positions }).await.unwrap();
    let got: BTreeMap<(i32, i64), Record> = read_n(&mut c, sent.len(), Duration::from_secs(20))
        .await
        .into_iter()
        .map(|r| ((r.partition, r.offset), r))
        .collect();
    for (s, place) in sent.iter().zip(&placed) {
        let r = &got[place];
        assert_eq!(&*r.topic, t);
        assert_eq!((&r.key, &r.value), (&s.key, &s.value), "at {place:?}");
        assert!(r.timestamp_ms >= before - 1000 && r.timestamp_ms <= now_ms() + 1000, "{}", r.timestamp_ms);
    }
    assert_eq!(got[&placed[3]].key, Some(Vec::new()), "an empty key is not a missing key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_land_where_kafka_and_the_embedded_log_put_them() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let embedded = EmbeddedLog::open(dir.path()).unwrap();
    embedded.ensure_topic(&spec(&t, 4)).await.unwrap();
    let keys: Vec<String> = (0..40).map(|i| format!("tx-{i}")).collect();
    let records: Vec<OutRecord> = keys.iter().map(|k| OutRecord::keyed(k.as_str(), k.as_bytes().to_vec())).collect();
    let on_kafka = log.append(&t, records.clone()).await.unwrap();
    let on_embedded = embedded.append(&t, records).await.unwrap();
    assert_eq!(on_kafka, on_embedded, "same partitions and offsets on both logs");
    assert!(on_kafka.iter().map(|(p, _)| p).collect::<BTreeSet<_>>().len() > 1, "40 keys spread over partitions");
    for (key, (p, _)) in keys.iter().zip(&on_kafka) {
        assert_eq!(*p, partition_for(key.as_bytes(), 4), "{key}");
    }
    // And a consumer sees each key in that partition.
    let positions = (0..4).map(|p| (t.clone(), p, 0)).collect();
    let mut c = log.consumer(Subscription::Assign { positions }).await.unwrap();
    for r in read_n(&mut c, 40, Duration::from_secs(20)).await {
        assert_eq!(r.partition, partition_for(r.key.as_deref().unwrap(), 4));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_are_contiguous_per_partition_and_end_offsets_follow() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 3).await;
    let first = log.append(&t, vec![OutRecord::to_partition(0, b"a"), OutRecord::to_partition(2, b"b"), OutRecord::to_partition(0, b"c")]).await.unwrap();
    assert_eq!(first, vec![(0, 0), (2, 0), (0, 1)]);
    let second = log.append(&t, vec![OutRecord::to_partition(2, b"d"), OutRecord::to_partition(0, b"e"), OutRecord::to_partition(1, b"f")]).await.unwrap();
    assert_eq!(second, vec![(2, 1), (0, 2), (1, 0)]);
    let mut ends = Vec::new();
    for p in 0..3 {
        ends.push(log.end_offset(&t, p).await.unwrap());
    }
    assert_eq!(ends, [3, 1, 2]);
    // Concurrent appenders get distinct, gap-free offsets.
    let tasks: Vec<_> = (0..2u8)
        .map(|w| {
            let (log, t) = (log.clone(), t.clone());
            tokio::spawn(async move {
                let mut placed = Vec::new();
                for b in 0..10u8 {
                    placed.extend(log.append(&t, vec![OutRecord::to_partition(1, [w, b, 0]), OutRecord::to_partition(1, [w, b, 1])]).await.unwrap());
                }
                placed
            })
        })
        .collect();
    let mut offsets = Vec::new();
    for task in tasks {
        offsets.extend(task.await.unwrap().into_iter().map(|(_, o)| o));
    }
    offsets.sort();
    assert_eq!(offsets, (1..41).collect::<Vec<i64>>());
    assert_eq!(log.end_offset(&t, 1).await.unwrap(), 41);
    let mut c = log.consumer(Subscription::assign(&t, 0, 0)).await.unwrap();
    let values: Vec<_> = read_n(&mut c, 3, Duration::from_secs(20)).await.into_iter().map(|r| (r.offset, r.value)).collect();
    assert_eq!(values, vec![(0, b"a".to_vec()), (1, b"c".to_vec()), (2, b"e".to_vec())]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailing_consumer_wakes_when_a_record_arrives() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 2).await;
    for sub in [Subscription::assign(&t, 1, 0), Subscription::group(&unique("g"), &t)] {
        let mut c = log.consumer(sub.clone()).await.unwrap();
        // Let the consumer settle (a group joins first), then append while it waits.
        assert!(c.poll(10, Duration::from_millis(500)).await.unwrap().is_empty() || matches!(sub, Subscription::Group { .. }));
        let appender = log.clone();
        let t2 = t.clone();
        let appended = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            appender.append(&t2, vec![OutRecord::to_partition(1, b"late")]).await.unwrap();
            Instant::now()
        });
        let mut got = Vec::new();
        let started = Instant::now();
        while got.is_empty() && started.elapsed() < Duration::from_secs(30) {
            got = c.poll(10, Duration::from_secs(30)).await.unwrap();
        }
        let woke = Instant::now();
        let appended = appended.await.unwrap();
        assert_eq!(got.iter().map(|r| r.value.as_slice()).collect::<Vec<_>>(), vec![b"late"], "{sub:?}");
        let latency = woke.saturating_duration_since(appended);
        println!("{sub:?}: woke {latency:?} after the append returned");
        assert!(latency < Duration::from_secs(2), "woke {latency:?} after the append");
    }
    // With nothing appended, poll returns empty once the wait is over.
    let mut c = log.consumer(Subscription::assign(&t, 0, 0)).await.unwrap();
    let started = Instant::now();
    assert!(c.poll(10, Duration::from_millis(300)).await.unwrap().is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commits_and_a_new_member_resumes_after_the_commit() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 2).await;
    let g = unique("g");
    log.append(&t, (0..5).map(|i| OutRecord::to_partition(0, [i])).chain((0..3).map(|i| OutRecord::to_partition(1, [i]))).collect()).await.unwrap();
    let mut c = log.consumer(Subscription::group(&g, &t)).await.unwrap();
    assert_eq!(read_n(&mut c, 8, Duration::from_secs(30)).await.len(), 8);
    assert_eq!(c.assignment(), vec![(t.clone(), 0), (t.clone(), 1)]);
    assert_eq!(log.committed_offset(&g, &t, 0).await.unwrap(), None);
    let topic: Arc<str> = t.as_str().into();
    c.commit(&[(topic.clone(), 0, 2), (topic.clone(), 1, 0)]).await.unwrap();
    assert_eq!(log.committed_offset(&g, &t, 0).await.unwrap(), Some(3));
    assert_eq!(log.committed_offset(&g, &t, 1).await.unwrap(), Some(1));
    assert!(c.commit(&[(topic.clone(), 0, -1)]).await.is_err());
    drop(c);
    let mut c = log.consumer(Subscription::group(&g, &t)).await.unwrap();
    let got: BTreeSet<(i32, i64)> = read_n(&mut c, 4, Duration::from_secs(30)).await.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(got, BTreeSet::from([(0, 3), (0, 4), (1, 1), (1, 2)]));
    expect_nothing(&mut c, Duration::from_millis(500)).await;
    // Another group starts from the beginning.
    let mut other = log.consumer(Subscription::group(&unique("g"), &t)).await.unwrap();
    assert_eq!(read_n(&mut other, 8, Duration::from_secs(30)).await.len(), 8);
    // Assigned consumers have no group to commit for.
    let mut assigned = log.consumer(Subscription::assign(&t, 0, 0)).await.unwrap();
    let err = assigned.commit(&[(topic, 0, 0)]).await.unwrap_err();
    assert!(err.message.contains("no group"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_of_one_group_split_four_partitions() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 4).await;
    let g = unique("g");
    let mut a = log.consumer(Subscription::group(&g, &t)).await.unwrap();
    let mut b = log.consumer(Subscription::group(&g, &t)).await.unwrap();
    // Poll both until the group settles with each member owning two partitions.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut early: Vec<Record> = Vec::new();
    loop {
        early.extend(a.poll(100, Duration::from_millis(100)).await.unwrap());
        early.extend(b.poll(100, Duration::from_millis(100)).await.unwrap());
        if a.assignment().len() == 2 && b.assignment().len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no split: {:?} / {:?}", a.assignment(), b.assignment());
    }
    assert!(early.is_empty());
    let owned: BTreeSet<(String, i32)> = a.assignment().into_iter().chain(b.assignment()).collect();
    assert_eq!(owned.len(), 4, "disjoint and covering: {:?} / {:?}", a.assignment(), b.assignment());
    log.append(&t, (0..4).flat_map(|p| (0..5u8).map(move |i| OutRecord::to_partition(p, [p as u8, i]))).collect()).await.unwrap();
    let mut seen: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < 20 {
        assert!(Instant::now() < deadline, "read {} of 20", seen.len());
        for (who, c) in [(0usize, &mut a), (1, &mut b)] {
            for r in c.poll(100, Duration::from_millis(100)).await.unwrap() {
                assert!(c.assignment().contains(&(t.clone(), r.partition)), "member {who} read a partition it does not own");
                *seen.entry((r.partition, r.offset)).or_default() += 1;
            }
        }
    }
    assert!(seen.values().all(|n| *n == 1), "each record read once: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assign_from_an_offset_end_offset_and_lag() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 1).await;
    log.append(&t, (0..10u8).map(|i| OutRecord::to_partition(0, [i])).collect()).await.unwrap();
    assert_eq!(log.end_offset(&t, 0).await.unwrap(), 10);
    let mut c = log.consumer(Subscription::assign(&t, 0, 3)).await.unwrap();
    assert_eq!(c.assignment(), vec![(t.clone(), 0)]);
    assert_eq!(c.lag(), vec![(t.clone(), 0, 7)], "lag before reading");
    let got = read_n(&mut c, 4, Duration::from_secs(20)).await;
    assert_eq!(got.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
    assert_eq!(got[0].value, vec![3]);
    assert_eq!(c.lag(), vec![(t.clone(), 0, 3)]);
    read_n(&mut c, 3, Duration::from_secs(20)).await;
    assert_eq!(c.lag(), vec![(t.clone(), 0, 0)]);
    // New records show as lag once the watermarks are refreshed (at most a second old).
    log.append(&t, vec![OutRecord::to_partition(0, b"x"), OutRecord::to_partition(0, b"y")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.lag() != vec![(t.clone(), 0, 2)] {
        assert!(Instant::now() < deadline, "lag stayed {:?}", c.lag());
        // A poll of nothing still refreshes the watermarks when they are due.
        c.poll(0, Duration::from_millis(100)).await.unwrap();
    }
    // The end is a valid start (tail); past it is refused, naming the offset.
    assert!(log.consumer(Subscription::assign(&t, 0, 12)).await.is_ok());
    let err = log.consumer(Subscription::assign(&t, 0, 13)).await.err().expect("out of range").to_string();
    assert!(err.contains("offset 13") && err.contains(&t), "{err}");
    // A group member's lag counts from the group's committed offset.
    let g = unique("g");
    let mut m = log.consumer(Subscription::group(&g, &t)).await.unwrap();
    assert_eq!(m.lag(), vec![(t.clone(), 0, 12)], "before the group assigns anything, the group's lag");
    let first = read_n(&mut m, 1, Duration::from_secs(30)).await;
    assert_eq!(first[0].offset, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lag = m.lag();
        let lag_of = lag.first().map(|l| l.2);
        // 12 records, one read; more may have been returned already by later polls.
        if lag_of.is_some_and(|l| l <= 11) {
            break;
        }
        assert!(Instant::now() < deadline, "group lag {lag:?}");
        let _ = m.poll(0, Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_topic_and_partition() {
    let broker = Broker::start();
    let log = broker.log().await;
    let t = topic(&log, 2).await;
    streamledger_ports::conformance::missing_topics_are_named_and_not_retried(log.as_ref()).await;
    let err = log.append(&t, vec![OutRecord::to_partition(2, b"x")]).await.unwrap_err().to_string();
    assert!(err.contains(&format!("partition 2 of topic {t}")), "{err}");
    assert_eq!(log.end_offset(&t, 0).await.unwrap(), 0, "a refused batch appends nothing");
    // ensure_topic on an existing topic leaves it alone.
    log.append(&t, vec![OutRecord::to_partition(1, b"kept")]).await.unwrap();
    log.ensure_topic(&spec(&t, 5)).await.unwrap();
    assert_eq!(log.partition_count(&t).await.unwrap(), 2);
    assert_eq!(log.end_offset(&t, 1).await.unwrap(), 1);
    // An unreachable cluster is a retryable error naming it.
    let nobody = streamledger_kafka::KafkaConfig::bootstrap("127.0.0.1:1");
    let err = KafkaLog::connect(nobody).await.err().expect("nobody listens on port 1");
    assert!(err.retryable && err.to_string().contains("127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_apply_creates_then_reports_ok_and_drift_without_changing_anything() {
    let broker = Broker::start();
    let log = broker.log().await;
    let channel = unique("ch");
    let wanted = Topics::default_for(&channel);
    let first = topics::apply(log.admin(), &wanted).await.unwrap();
    println!("first apply:\n{first}");
    assert_eq!(first.topics.len(), wanted.all().count(), "one report per topic of topics/topics.toml");
    assert!(first.topics.len() >= 8, "{first}");
    assert!(first.topics.iter().all(|t| t.status == Status::Created), "{first}");
    let second = topics::apply(log.admin(), &wanted).await.unwrap();
    println!("second apply:\n{second}");
    assert!(second.topics.iter().all(|t| t.status == Status::Ok), "{second}");
    assert!(second.is_clean());

    // The same channel with 8 proposal partitions: drift, reported and left as it is.
    let more = streamledger_ports::topics::DEFAULT_TOPICS_TOML.replace("partitions = 4", "partitions = 8");
    let drifted = Topics::parse(&channel, &more).unwrap();
    let report = topics::check(log.admin(), &drifted).await.unwrap();
    println!("check with 8 partitions:\n{report}");
    let proposals = format!("{channel}.proposals");
    let p = report.topics.iter().find(|t| t.name == proposals).unwrap();
    match &p.status {
        Status::Drift(d) => assert!(d.iter().any(|d| d.what == "partitions" && d.found == "4" && d.wanted == "8"), "{d:?}"),
        other => panic!("expected drift, got {other:?}"),
    }
    assert!(report.to_string().contains("DRIFT: partitions is 4 (wanted 8)"), "{report}");
    assert_eq!(log.partition_count(&proposals).await.unwrap(), 4, "drift is never fixed silently");

    // A topic created by hand with other configs: drift in configs (if the broker reports them).
    let other = unique("ch");
    let by_hand = Topics::default_for(&other);
    let mut spec = by_hand.spec("blocks").clone();
    spec.configs.insert("retention.ms".into(), "86400000".into());
    log.admin().create_topic(&spec).await.unwrap();
    let report = topics::check(log.admin(), &by_hand).await.unwrap();
    println!("check with a hand-made blocks topic:\n{report}");
    let blocks = report.topics.iter().find(|t| t.name == spec.name).unwrap();
    let missing = report.topics.iter().filter(|t| t.status == Status::Missing).count();
    assert_eq!(missing, by_hand.all().count() - 1, "check creates nothing: {report}");
    let configs_unchecked = blocks.notes.iter().any(|n| n.contains("cannot check"));
    match &blocks.status {
        Status::Drift(d) => assert!(d.iter().any(|d| d.what == "retention.ms" && d.found == "86400000"), "{d:?}"),
        Status::Ok => assert!(configs_unchecked, "retention drift neither found nor reported as unchecked: {report}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_and_group_offsets_survive_a_broker_kill_9() {
    let broker = Broker::start();
    let channel = unique("ch");
    let topics = Topics::default_for(&channel);
    let g = unique("g");
    let (proposals, blocks) = (topics.name("proposals").to_string(), topics.name("blocks").to_string());
    let log = broker.log().await;
    topics::apply(log.admin(), &topics).await.unwrap();
    let mut placed = Vec::new();
    for batch in 0..10 {
        let records = (0..10).map(|i| OutRecord::keyed(format!("tx-{batch}-{i}"), vec![batch, i])).collect();
        placed.extend(log.append(&proposals, records).await.unwrap());
    }
    log.append(&blocks, (0..5u8).map(|i| OutRecord::to_partition(0, [i])).collect()).await.unwrap();
    {
        let mut c = log.consumer(Subscription::group(&g, &blocks)).await.unwrap();
        let got = read_n(&mut c, 5, Duration::from_secs(30)).await;
        c.commit(&[(got[2].topic.clone(), 0, 2)]).await.unwrap();
    }
    let mut tail = log.consumer(Subscription::assign(&blocks, 0, 5)).await.unwrap();
    // The same retention.ms=-1 written as is (Apache Kafka's spelling): tansu 0.6.0's retention
    // pass, which runs at start, deletes every record of such a topic. This is why the tests
    // (and any tansu deployment) set streamledger.infinite.retention.ms.
    let plain = KafkaLog::connect(streamledger_kafka::KafkaConfig::bootstrap(&broker.bootstrap())).await.unwrap();
    let wiped = unique("minus-one");
    plain.ensure_topic(&spec(&wiped, 1)).await.unwrap();
    plain.append(&wiped, (0..3u8).map(|i| OutRecord::to_partition(0, [i])).collect()).await.unwrap();

    broker.kill9();
    broker.restart();

    let fresh = broker.log().await;
    for p in 0..4 {
        let acknowledged = placed.iter().filter(|(q, _)| *q == p).count() as i64;
        assert_eq!(fresh.end_offset(&proposals, p).await.unwrap(), acknowledged, "partition {p}");
    }
    let positions = (0..4).map(|p| (proposals.clone(), p, 0)).collect();
    let mut c = fresh.consumer(Subscription::Assign { positions }).await.unwrap();
    let back: BTreeSet<(i32, i64)> = read_n(&mut c, 100, Duration::from_secs(30)).await.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(back, placed.iter().copied().collect::<BTreeSet<_>>(), "every acknowledged record is back");
    assert_eq!(fresh.committed_offset(&g, &blocks, 0).await.unwrap(), Some(3));
    let mut c = fresh.consumer(Subscription::group(&g, &blocks)).await.unwrap();
    let resumed = read_n(&mut c, 2, Duration::from_secs(30)).await;
    assert_eq!(resumed.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![3, 4]);
    // The clients that lived through the crash go on: the idempotent producer appends where the
    // log was, and a consumer assigned before the crash reads it.
    assert_eq!(log.append(&blocks, vec![OutRecord::to_partition(0, b"after")]).await.unwrap(), vec![(0, 5)]);
    let after = read_n(&mut tail, 1, Duration::from_secs(30)).await;
    assert_eq!((after[0].offset, after[0].value.as_slice()), (5, &b"after"[..]));

    assert_eq!(fresh.end_offset(&wiped, 0).await.unwrap(), 0, "tansu 0.6.0 wiped the retention.ms=-1 topic (and reports end offset 0)");
    // ...though its next offset is still 3: the broker's watermarks are wrong for a wiped topic.
    assert_eq!(plain.append(&wiped, vec![OutRecord::to_partition(0, b"x")]).await.unwrap(), vec![(0, 3)]);
}
