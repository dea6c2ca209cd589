//! The prefetching loader and the transforms.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rlprune::data::transforms::{self, Transform};
use rlprune::data::{Batch, DataConfig, Dataset, DatasetKind, Loader, Sample};

/// `n` 1x2x3 images; image `i` holds the value `i / 1000` everywhere except pixel (0, 0, 0),
/// which is 0. Labels are `i % 3`. Counts `get` calls; fails at `fail_at`. For the prefetch
/// test, each read also records how far ahead of the consumer (`taken` batches received) the
/// batch it belongs to is, reads being numbered in order (one loader worker).
struct Counting {
    n: usize,
    gets: AtomicUsize,
    fail_at: Option<usize>,
    batch: usize,
    taken: AtomicUsize,
    max_lead: AtomicUsize,
}

impl Counting {
    fn new(n: usize) -> Arc<Self> {
        Arc::new(Self::failing_at(n, None))
    }
    fn failing_at(n: usize, fail_at: Option<usize>) -> Self {
        Self { n, gets: AtomicUsize::new(0), fail_at, batch: 1, taken: AtomicUsize::new(0), max_lead: AtomicUsize::new(0) }
    }
}

impl Dataset for Counting {
    fn len(&self) -> usize {
        self.n
    }
    fn get(&self, index: usize) -> anyhow::Result<Sample> {
        let read = self.gets.fetch_add(1, Ordering::SeqCst);
        let lead = (read / self.batch).saturating_sub(self.taken.load(Ordering::SeqCst));
        self.max_lead.fetch_max(lead, Ordering::SeqCst);
        if Some(index) == self.fail_at {
            anyhow::bail!("counting: cannot read image {index}");
        }
        let mut image = vec![index as f32 / 1000.0; 6];
        image[0] = 0.0;
        Ok(Sample { image, label: index % 3 })
    }
    fn image_shape(&self) -> [usize; 3] {
        [1, 2, 3]
    }
    fn num_classes(&self) -> usize {
        3
    }
    fn describe(&self) -> String {
        format!("counting ({} images)", self.n)
    }
}

fn cfg(batch: usize) -> DataConfig {
    let mut c = DataConfig::for_dataset(DatasetKind::Synthetic);
    c.batch_size = batch;
    c.eval_batch_size = batch;
    c.normalize = false;
    c.drop_last = false;
    c
}

fn collect(loader: &Loader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch).collect::<anyhow::Result<Vec<_>>>().unwrap()
}

fn order_of(batches: &[Batch]) -> Vec<usize> {
    batches.iter().flat_map(|b| b.indices.clone()).collect()
}

#[test]
fn every_index_once_per_epoch_and_batches_match_their_indices() {
    let ds = Counting::new(103);
    for (train, workers) in [(true, 1), (true, 3), (false, 2)] {
        let mut c = cfg(10);
        c.workers = workers;
        let loader = Loader::new(ds.clone(), &c, train, 7);
        assert_eq!(loader.num_batches(), 11);
        assert_eq!(loader.output_shape(), [1, 2, 3]);
        let batches = collect(&loader, 0);
        assert_eq!(batches.len(), 11);
        assert_eq!(batches[10].shape, [3, 1, 2, 3]);
        let order = order_of(&batches);
        assert_eq!(order.len(), 103);
        assert_eq!(order.iter().copied().collect::<HashSet<_>>().len(), 103);
        if !train {
            assert_eq!(order, (0..103).collect::<Vec<_>>(), "evaluation reads in dataset order");
        } else {
            assert_ne!(order, (0..103).collect::<Vec<_>>(), "training shuffles");
        }
        for b in &batches {
            for (k, &i) in b.indices.iter().enumerate() {
                assert_eq!(b.labels[k], (i % 3) as i64);
                assert_eq!(b.images[k * 6 + 1], i as f32 / 1000.0);
            }
        }
    }
}

#[test]
fn drop_last_keeps_full_training_batches_only() {
    let ds = Counting::new(103);
    let mut c = cfg(10);
    c.drop_last = true;
    let train = Loader::new(ds.clone(), &c, true, 1);
    assert_eq!(train.num_batches(), 10);
    let batches = collect(&train, 3);
    assert!(batches.iter().all(|b| b.len() == 10));
    assert_eq!(order_of(&batches).iter().collect::<HashSet<_>>().len(), 100);
    // Evaluation never drops.
    assert_eq!(Loader::new(ds.clone(), &c, false, 1).num_batches(), 11);
    // Fewer images than one batch: one partial batch rather than none.
    let small = Loader::new(Counting::new(4), &c, true, 1);
    assert_eq!(small.num_batches(), 1);
    assert_eq!(collect(&small, 0)[0].len(), 4);
}

#[test]
fn order_and_augmentation_are_a_function_of_seed_epoch_train() {
    let ds: Arc<dyn Dataset> = Arc::new(rlprune::data::synthetic::Synthetic::new(
        rlprune::data::synthetic::SyntheticSpec::from_config(&DataConfig::default()),
        rlprune::data::Split::Train,
    ));
    let mut c = cfg(16);
    c.train_size = 64;
    c.random_crop_padding = 2;
    c.hflip = true;
    c.normalize = true;
    let a = Loader::new(ds.clone(), &c, true, 42);
    let mut c3 = c.clone();
    c3.workers = 3;
    c3.prefetch = 1;
    let b = Loader::new(ds.clone(), &c3, true, 42);
    let e2a = collect(&a, 2);
    // Same (seed, epoch): identical batches, whatever the worker count, and again on rerun.
    assert_eq!(e2a, collect(&b, 2));
    assert_eq!(e2a, collect(&a, 2));
    // Resuming: a single batch built directly equals the streamed one.
    assert_eq!(a.batch(2, 3).unwrap(), e2a[3]);
    // Different epoch: different order; different seed: different order.
    let e3 = collect(&a, 3);
    assert_ne!(order_of(&e2a), order_of(&e3));
    assert_ne!(order_of(&e2a), order_of(&collect(&Loader::new(ds.clone(), &c, true, 43), 2)));
    // Augmentation differs between epochs for the same image.
    let pos2 = order_of(&e2a).iter().position(|&i| i == 5).unwrap();
    let pos3 = order_of(&e3).iter().position(|&i| i == 5).unwrap();
    let img = |bs: &[Batch], pos: usize| bs[pos / 16].images[(pos % 16) * 784..(pos % 16 + 1) * 784].to_vec();
    assert_ne!(img(&e2a, pos2), img(&e3, pos3));
    // Evaluation: no augmentation, same images every epoch.
    let ev = Loader::new(ds.clone(), &c, false, 42);
    assert_eq!(collect(&ev, 0), collect(&ev, 5));
}

/// Waits until `ds` has served `reads` reads; fails (rather than hangs) if that never happens.
fn await_reads(ds: &Counting, reads: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ds.gets.load(Ordering::SeqCst) < reads {
        assert!(std::time::Instant::now() < deadline, "the producer stopped at {} reads, expected {reads}", ds.gets.load(Ordering::SeqCst));
        std::thread::yield_now();
    }
}

/// With one worker and `prefetch = 3`, after `t` batches are received the producer fills the
/// channel (batches t..t+2) and builds batch t+3, then blocks. The consumer waits for exactly
/// that before taking each batch (so the producer must run ahead), and every read records its
/// batch's lead over the batches received: never more than prefetch + 1 (+1 for the moment
/// between a receive and the count). No timing is involved.
#[test]
fn prefetch_runs_ahead_of_a_slow_consumer_but_stays_bounded() {
    let (n, batch, prefetch) = (64, 4, 3);
    let ds = Arc::new(Counting { batch, ..Counting::failing_at(n, None) });
    let mut c = cfg(batch);
    c.prefetch = prefetch;
    c.workers = 1;
    let loader = Loader::new(ds.clone(), &c, true, 0);
    let mut it = loader.epoch(0);
    let mut seen = Vec::new();
    for t in 0..n / batch {
        await_reads(&ds, (n / batch).min(t + prefetch + 1) * batch);
        let b = it.next().unwrap().unwrap();
        ds.taken.fetch_add(1, Ordering::SeqCst);
        assert_eq!(b.len(), batch);
        seen.extend(b.indices);
    }
    assert!(it.next().is_none());
    let lead = ds.max_lead.load(Ordering::SeqCst);
    assert!(lead >= prefetch && lead <= prefetch + 2, "the producer ran {lead} batches ahead");
    seen.sort_unstable();
    assert_eq!(seen, (0..64).collect::<Vec<_>>());
    // Dropping an epoch early stops its threads (this would hang otherwise).
    let mut it = loader.epoch(1);
    it.next().unwrap().unwrap();
    drop(it);
}

#[test]
fn errors_end_the_stream_and_bad_config_is_reported() {
    let ds = Arc::new(Counting::failing_at(40, Some(17)));
    let loader = Loader::new(ds, &cfg(5), false, 0);
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 4, "batches 0..3 then the error in batch 3");
    assert!(items[..3].iter().all(|b| b.is_ok()));
    let e = items[3].as_ref().unwrap_err().to_string();
    assert!(e.contains("cannot read image 17"), "{e}");

    // A mean for the wrong number of channels.
    let mut c = cfg(5);
    c.normalize = true;
    c.mean = Some(vec![0.1, 0.2]);
    assert!(Loader::try_new(Counting::new(10), &c, true, 0).is_err());
    let loader = Loader::new(Counting::new(10), &c, true, 0);
    let items: Vec<_> = loader.epoch(0).collect();
    assert_eq!(items.len(), 1);
    let e = items[0].as_ref().unwrap_err().to_string();
    assert!(e.contains("data.mean") && e.contains("got 2"), "{e}");
}

#[test]
fn batch_to_tensors() {
    let loader = Loader::new(Counting::new(10), &cfg(4), false, 0);
    let b = loader.batch(0, 1).unwrap();
    let device = Default::default();
    let (x, y) = b.to_tensors::<rlprune::Cpu>(&device);
    assert_eq!(x.dims(), [4, 1, 2, 3]);
    assert_eq!(y.dims(), [4]);
    assert_eq!(y.into_data().convert::<i64>().to_vec::<i64>().unwrap(), vec![1, 2, 0, 1]);
    let xs = x.into_data().to_vec::<f32>().unwrap();
    assert_eq!(xs[6 + 1], 0.005);
}

// ---------------------------------------------------------------- transforms

#[test]
fn normalize_uses_per_channel_mean_and_std() {
    let mut img = vec![0.0, 0.5, 1.0, 0.2, 0.4, 0.6];
    transforms::normalize(&mut img, [2, 1, 3], &[0.5, 0.2], &[0.5, 0.1]);
    let want = [-1.0, 0.0, 1.0, 0.0, 2.0, 4.0];
    for (a, b) in img.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{img:?}");
    }
    // Standard statistics by dataset.
    let c = DataConfig::for_dataset(DatasetKind::FashionMnist);
    assert_eq!(c.normalization().unwrap(), Some((vec![0.2860], vec![0.3530])));
    let c = DataConfig::for_dataset(DatasetKind::Cifar10);
    assert_eq!(c.normalization().unwrap().unwrap().1, vec![0.2470, 0.2435, 0.2616]);
    let mut c = DataConfig::for_dataset(DatasetKind::Cifar10);
    c.mean = Some(vec![0.5]);
    assert_eq!(c.normalization().unwrap().unwrap().0, vec![0.5; 3]);
}

#[test]
fn pad_crop_shifts_with_zero_fill() {
    // 1x2x3: [[1 2 3] [4 5 6]]
    let img = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let s = [1, 2, 3];
    assert_eq!(transforms::pad_crop(&img, s, 1, 1, 1), img.to_vec(), "centre window is the image");
    assert_eq!(transforms::pad_crop(&img, s, 1, 0, 0), vec![0.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
    assert_eq!(transforms::pad_crop(&img, s, 1, 2, 2), vec![5.0, 6.0, 0.0, 0.0, 0.0, 0.0]);
    assert_eq!(transforms::pad_crop(&img, s, 1, 1, 0), vec![0.0, 1.0, 2.0, 0.0, 4.0, 5.0]);
    assert_eq!(transforms::pad_crop(&img, s, 2, 3, 2), vec![4.0, 5.0, 6.0, 0.0, 0.0, 0.0]);
}

#[test]
fn hflip_mirrors_each_row_of_each_channel() {
    let mut img = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0];
    transforms::hflip(&mut img, [2, 2, 3]);
    assert_eq!(img, vec![3.0, 2.0, 1.0, 6.0, 5.0, 4.0, 9.0, 8.0, 7.0, 12.0, 11.0, 10.0]);
}

#[test]
fn bilinear_resize_matches_hand_computed_values() {
    // [[0 1] [2 3]] -> 4x4 with half-pixel centres: source coordinates -0.25 (clamped to 0),
    // 0.25, 0.75, 1.25 (clamped to 1): weights 0, .25, .75, 1 along each axis.
    let out = transforms::resize_bilinear(&[0.0, 1.0, 2.0, 3.0], [1, 2, 2], [4, 4]);
    let w = [0.0, 0.25, 0.75, 1.0];
    for y in 0..4 {
        for x in 0..4 {
            let want = w[x] + 2.0 * w[y];
            assert!((out[y * 4 + x] - want).abs() < 1e-6, "({y},{x}): {} vs {want}", out[y * 4 + x]);
        }
    }
    // Downscale 4x4 -> 2x2: source coordinates 0.5 and 2.5, i.e. averages of 2x2 blocks here.
    let src: Vec<f32> = (0..16).map(|v| v as f32).collect();
    assert_eq!(transforms::resize_bilinear(&src, [1, 4, 4], [2, 2]), vec![2.5, 4.5, 10.5, 12.5]);
    // Constant images stay constant; channels are independent; same size is identity.
    let two = [vec![0.3f32; 9], vec![0.7f32; 9]].concat();
    let r = transforms::resize_bilinear(&two, [2, 3, 3], [5, 4]);
    assert_eq!(r.len(), 40);
    assert!(r[..20].iter().all(|v| (v - 0.3).abs() < 1e-6) && r[20..].iter().all(|v| (v - 0.7).abs() < 1e-6));
    assert_eq!(transforms::resize_bilinear(&two, [2, 3, 3], [3, 3]), two);
}

#[test]
fn transform_pipeline_applies_train_augmentation_only_for_training() {
    let mut c = DataConfig::for_dataset(DatasetKind::Mnist);
    c.resize = Some([4, 6]);
    c.random_crop_padding = 1;
    c.hflip = true;
    c.normalize = false;
    let eval = Transform::from_config(&c, [1, 2, 3], false).unwrap();
    let train = Transform::from_config(&c, [1, 2, 3], true).unwrap();
    assert_eq!(eval.output_shape(), [1, 4, 6]);
    assert!(!eval.is_random() && train.is_random());
    let img = vec![0.5f32; 6];
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    assert_eq!(eval.apply(img.clone(), &mut rng).unwrap(), vec![0.5; 24]);
    // Training: each output is the resized image shifted by at most one pixel (zeros enter).
    let mut saw_zero = false;
    for _ in 0..20 {
        let out = train.apply(img.clone(), &mut rng).unwrap();
        assert_eq!(out.len(), 24);
        assert!(out.iter().all(|&v| v == 0.0 || v == 0.5));
        saw_zero |= out.contains(&0.0);
    }
    assert!(saw_zero);
    // A wrongly sized image is an error, not a panic.
    assert!(eval.apply(vec![0.0; 5], &mut rng).is_err());
    // Loader output shape follows resize.
    let loader = Loader::new(Counting::new(8), &c, true, 0);
    assert_eq!(loader.output_shape(), [1, 4, 6]);
    assert_eq!(loader.batch(0, 0).unwrap().shape[1..], [1, 4, 6]);
}
