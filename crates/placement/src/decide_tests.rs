use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::demand::{Accel, Arch, Tier};

const GIB: u32 = 1024;

fn worker(id: &str, cpus: u32, mem: u32) -> Candidate {
    Candidate {
        id: id.into(),
        healthy: true,
        draining: false,
        arch: Arch::Amd64,
        accel: Accel::Kvm,
        total_cpus: 32,
        total_memory_mb: 128 * GIB,
        total_disk_mb: 1 << 20,
        free_cpus: cpus,
        free_memory_mb: mem,
        free_disk_mb: 1 << 19,
        templates: vec!["base".into(), "python".into()],
        warm: Vec::new(),
        orgs: BTreeMap::new(),
        paid: 0,
        free: 0,
    }
}

fn demand(cpus: u32, mem: u32) -> Demand {
    Demand {
        cpus,
        memory_mb: mem,
        disk_mb: 2048,
        template: "base".into(),
        org: "acme".into(),
        tier: Tier::Paid,
        arch: None,
        accel: None,
        prefer_worker: None,
    }
}

fn order(ws: &[Candidate], d: &Demand) -> Vec<String> {
    decide(ws, d, &Weights::default()).order
}

fn rejection(ws: &[Candidate], d: &Demand) -> Rejection {
    let decision = decide(ws, d, &Weights::default());
    match &decision.verdicts[0].outcome {
        Outcome::Rejected(why) => why.clone(),
        Outcome::Scored(s) => panic!("scored {s:?}"),
    }
}

#[test]
fn every_rejection_names_its_reason() {
    let d = demand(2, 2 * GIB);
    let mut w = worker("a", 32, 64 * GIB);
    w.healthy = false;
    assert_eq!(rejection(&[w], &d), Rejection::Unhealthy);

    let mut w = worker("a", 32, 64 * GIB);
    w.draining = true;
    assert_eq!(rejection(&[w], &d), Rejection::Draining);

    let mut arm = demand(2, 2 * GIB);
    arm.arch = Some(Arch::Arm64);
    assert_eq!(
        rejection(&[worker("a", 32, 64 * GIB)], &arm),
        Rejection::Arch { want: Arch::Arm64, have: Arch::Amd64 }
    );

    let mut tcg = demand(2, 2 * GIB);
    tcg.accel = Some(Accel::Tcg);
    assert_eq!(
        rejection(&[worker("a", 32, 64 * GIB)], &tcg),
        Rejection::Accel { want: Accel::Tcg, have: Accel::Kvm }
    );

    let mut node = demand(2, 2 * GIB);
    node.template = "node".into();
    assert_eq!(
        rejection(&[worker("a", 32, 64 * GIB)], &node),
        Rejection::TemplateMissing { template: "node".into() }
    );

    assert_eq!(
        rejection(&[worker("a", 1, GIB)], &d),
        Rejection::Short { cpus: 1, memory_mb: GIB, disk_mb: 0 }
    );
}

#[test]
fn a_matching_hard_constraint_passes() {
    let mut d = demand(2, 2 * GIB);
    d.arch = Some(Arch::Amd64);
    d.accel = Some(Accel::Kvm);
    assert_eq!(order(&[worker("a", 4, 4 * GIB)], &d), ["a"]);
}

#[test]
fn packs_onto_the_fuller_worker() {
    // Least-loaded would pick "b"; best fit keeps "b" whole for a
    // large sandbox later.
    let ws = [worker("a", 8, 32 * GIB), worker("b", 32, 128 * GIB)];
    assert_eq!(order(&ws, &demand(2, 8 * GIB)), ["a", "b"]);
}

#[test]
fn avoids_leaving_a_sliver_too_small_to_use() {
    // On "a" the request would leave 7 vCPUs with 256 MiB: no usual
    // size fits there any more and the vCPUs are stranded. "b" fits
    // as tightly on CPU and stays usable.
    let ws = [worker("a", 8, 2 * GIB + 256), worker("b", 8, 8 * GIB)];
    let d = demand(1, 2 * GIB);
    let decision = decide(&ws, &d, &Weights::default());
    assert_eq!(decision.order, ["b", "a"]);
    let Outcome::Scored(s) = &decision.verdicts[1].outcome else {
        panic!("a should be scored");
    };
    assert!(s.frag < 0.0);
}

#[test]
fn fills_a_hole_that_only_this_request_can_use() {
    // "a" has 1 vCPU left that only the smallest size can use;
    // filling it leaves nothing stranded, a bonus on top of the fit.
    let ws = [worker("a", 1, 4 * GIB), worker("b", 9, 36 * GIB)];
    let decision = decide(&ws, &demand(1, 512), &Weights::default());
    assert_eq!(decision.order, ["a", "b"]);
    let Outcome::Scored(s) = &decision.verdicts[0].outcome else {
        panic!("a should be scored");
    };
    assert!(s.frag > 0.0);
}

#[test]
fn keeps_the_remainder_in_the_workers_own_ratio() {
    // Same memory on both, so best fit cannot tell them apart. A
    // memory-heavy request goes where CPU is already the scarcer
    // axis; on "b" it would leave lots of CPU with little memory.
    let ws = [worker("a", 4, 32 * GIB), worker("b", 16, 32 * GIB)];
    let d = demand(2, 16 * GIB);
    assert_eq!(order(&ws, &d), ["a", "b"]);
}

#[test]
fn a_warm_worker_wins_over_a_slightly_better_fit() {
    let mut warm = worker("b", 16, 64 * GIB);
    warm.warm = vec!["base".into()];
    let ws = [worker("a", 14, 56 * GIB), warm];
    assert_eq!(order(&ws, &demand(1, 512)), ["b", "a"]);
}

#[test]
fn affinity_and_prefer_worker_break_even_fits() {
    let mut near = worker("b", 16, 64 * GIB);
    near.orgs.insert("acme".into(), 3);
    near.paid = 3;
    let ws = [worker("a", 16, 64 * GIB), near];
    assert_eq!(order(&ws, &demand(1, 512)), ["b", "a"]);

    let mut d = demand(1, 512);
    d.prefer_worker = Some("a".into());
    assert_eq!(order(&ws, &d), ["a", "b"]);
}

#[test]
fn paid_keeps_away_from_free_tier_neighbours() {
    let mut mixed = worker("a", 16, 64 * GIB);
    mixed.free = 2;
    let ws = [mixed, worker("b", 16, 64 * GIB)];
    assert_eq!(order(&ws, &demand(1, 512)), ["b", "a"]);
    let mut free = demand(1, 512);
    free.tier = Tier::Free;
    assert_eq!(order(&ws, &free), ["a", "b"]);
}

#[test]
fn equal_scores_go_by_id() {
    let ws = [worker("c", 16, 64 * GIB), worker("a", 16, 64 * GIB)];
    assert_eq!(order(&ws, &demand(1, 512)), ["a", "c"]);
}

#[test]
fn a_zero_total_report_scores_finite() {
    let mut w = worker("a", 4, 4 * GIB);
    w.total_cpus = 0;
    w.total_memory_mb = 0;
    w.total_disk_mb = 0;
    let decision = decide(&[w], &demand(1, 512), &Weights::default());
    let Outcome::Scored(s) = &decision.verdicts[0].outcome else {
        panic!("should fit");
    };
    assert!(s.total.is_finite());
}

#[test]
fn the_decision_serialises_with_reasons_and_terms() {
    let ws = [worker("a", 4, 4 * GIB), worker("b", 1, GIB)];
    let decision = decide(&ws, &demand(2, 2 * GIB), &Weights::default());
    let json = serde_json::to_value(&decision).expect("serialises");
    assert_eq!(json["order"], serde_json::json!(["a"]));
    let scored = &json["verdicts"][0]["outcome"]["scored"];
    assert!(scored["total"].is_number());
    assert_eq!(scored["dominant"], "cpu");
    let why = &json["verdicts"][1]["outcome"]["rejected"];
    assert_eq!(why["reason"], "short");
    assert_eq!(why["cpus"], 1);
}

#[test]
fn the_terms_add_up_to_the_total() {
    let mut w = worker("a", 8, 16 * GIB);
    w.warm = vec!["base".into()];
    w.orgs.insert("acme".into(), 1);
    w.free = 1;
    let decision = decide(&[w], &demand(8, 16 * GIB), &Weights::default());
    let Outcome::Scored(s) = &decision.verdicts[0].outcome else {
        panic!("should fit");
    };
    let sum = s.pack
        + s.frag
        + s.balance
        + s.warmth
        + s.affinity
        + s.anti_affinity
        + s.prefer_worker
        + s.scarcity;
    assert!((sum - s.total).abs() < 1e-9);
}

fn arm(id: &str, cpus: u32, mem: u32) -> Candidate {
    let mut w = worker(id, cpus, mem);
    w.arch = Arch::Arm64;
    w
}

fn scored(d: &Decision, id: &str) -> Score {
    let v = d.verdicts.iter().find(|v| v.worker == id).expect("a verdict");
    match &v.outcome {
        Outcome::Scored(s) => s.clone(),
        Outcome::Rejected(why) => panic!("{id} rejected: {why:?}"),
    }
}

#[test]
fn keeps_scarce_hardware_for_requests_that_need_it() {
    // Nine amd64 workers and one arm64: the arm64 worker is the
    // tighter fit, but a request that runs anywhere goes to amd64.
    let mut ws: Vec<_> =
        (0..9).map(|i| worker(&format!("x{i}"), 32, 128 * GIB)).collect();
    ws.push(arm("arm", 4, 16 * GIB));
    let d = demand(2, 2 * GIB);
    let decision = decide(&ws, &d, &Weights::default());
    assert_eq!(decision.best(), Some("x0"));
    assert_eq!(decision.order.last().map(String::as_str), Some("arm"));
    let s = scored(&decision, "arm");
    assert!(s.scarcity < 0.0);
    // Without the term, best fit would have taken the arm64 worker.
    let off = Weights { scarcity: 0.0, ..Weights::default() };
    assert_eq!(decide(&ws, &d, &off).best(), Some("arm"));

    // A request that needs arm64 pays nothing for it.
    let mut need = demand(2, 2 * GIB);
    need.arch = Some(Arch::Arm64);
    let decision = decide(&ws, &need, &Weights::default());
    assert_eq!(decision.order, ["arm"]);
    assert!(scored(&decision, "arm").scarcity.abs() < f64::EPSILON);
}

#[test]
fn scarce_hardware_is_still_used_when_nothing_else_fits() {
    let ws =
        [worker("x", 1, GIB), worker("y", 1, GIB), arm("arm", 8, 32 * GIB)];
    assert_eq!(order(&ws, &demand(4, 8 * GIB)), ["arm"]);
}

#[test]
fn a_uniform_cell_has_no_scarcity_penalty() {
    let ws = [worker("a", 8, 32 * GIB), worker("b", 32, 128 * GIB)];
    let decision = decide(&ws, &demand(2, 2 * GIB), &Weights::default());
    for id in ["a", "b"] {
        assert!(scored(&decision, id).scarcity.abs() < f64::EPSILON);
    }
}

#[test]
fn a_rare_accelerator_counts_too() {
    let mut tcg = worker("t", 4, 16 * GIB);
    tcg.accel = Accel::Tcg;
    let mut ws: Vec<_> =
        (0..4).map(|i| worker(&format!("k{i}"), 32, 128 * GIB)).collect();
    ws.push(tcg);
    let o = order(&ws, &demand(1, 512));
    assert_eq!((o[0].as_str(), o[4].as_str()), ("k0", "t"));
    let mut need = demand(1, 512);
    need.accel = Some(Accel::Tcg);
    assert_eq!(order(&ws, &need), ["t"]);
}

#[test]
fn hardware_shares_count_only_workers_that_are_up() {
    let mut down = arm("d", 16, 64 * GIB);
    down.healthy = false;
    let ws = [worker("a", 32, 128 * GIB), arm("b", 32, 128 * GIB), down];
    let h = Scarcity::of(&ws).hardware;
    assert!((h.amd64 - 0.5).abs() < 1e-9 && (h.arm64 - 0.5).abs() < 1e-9);
    assert!((h.kvm - 1.0).abs() < 1e-9 && h.tcg.abs() < 1e-9);
    // Half the cell each: neither is scarce against the other.
    let d = decide(&ws, &demand(1, 512), &Weights::default());
    let (sa, sb) = (scored(&d, "a"), scored(&d, "b"));
    assert!((sa.scarcity - sb.scarcity).abs() < 1e-9);
}

#[test]
fn the_scarcity_weight_reads_from_toml_and_is_checked() {
    let w: Weights = toml::from_str("scarcity = 3.0\n").expect("parses");
    assert!((w.scarcity - 3.0).abs() < f64::EPSILON);
    let bad = Weights { scarcity: -1.0, ..Weights::default() };
    assert!(bad.validate().is_err());
}

#[test]
fn decide_top_scores_only_the_first_k_and_counts_the_rest() {
    let mut sick = worker("s", 32, 128 * GIB);
    sick.healthy = false;
    let ws = [
        worker("a", 8, 32 * GIB),
        worker("b", 32, 128 * GIB),
        worker("c", 16, 64 * GIB),
        worker("tiny", 1, GIB),
        sick,
        arm("arm", 16, 64 * GIB),
    ];
    let d = demand(2, 2 * GIB);
    let full = decide(&ws, &d, &Weights::default());
    let top = decide_top(&ws, &d, &Weights::default(), 2);
    assert_eq!(top.order, full.order);
    assert_eq!(top.best(), full.best());
    assert_eq!(top.top, full.verdicts[..2]);
    assert_eq!(
        top.rejected,
        Rejected { unhealthy: 1, short: 1, ..Rejected::default() }
    );
    let none = decide_top(&ws, &demand(64, GIB), &Weights::default(), 3);
    assert!(none.order.is_empty() && none.top.is_empty());
    assert_eq!(none.rejected.total(), 6);
}

fn arb_candidate() -> impl Strategy<Value = Candidate> {
    (
        (any::<bool>(), prop::bool::weighted(0.1), any::<bool>()),
        (any::<bool>(), 1u32..64, 1u32..(256 * GIB), 1u64..(1 << 21)),
        (0u32..=100, 0u32..=100, 0u32..=100),
        (prop::sample::subsequence(vec!["base", "python", "node"], 0..=3)),
        (prop::sample::subsequence(vec!["base", "python"], 0..=2)),
        (0u32..4, 0u32..3, 0u32..3),
    )
        .prop_map(|(flags, tot, pct, tpl, warm, n)| {
            let (healthy, draining, arm) = flags;
            let (tcg, cpus, mem, disk) = tot;
            // Free amounts as a share of the totals, so that both
            // "just fits" and "just short" come up.
            let share = |t: u64, p: u32| t * u64::from(p) / 100;
            Candidate {
                id: String::new(),
                healthy,
                draining,
                arch: if arm { Arch::Arm64 } else { Arch::Amd64 },
                accel: if tcg { Accel::Tcg } else { Accel::Kvm },
                total_cpus: cpus,
                total_memory_mb: mem,
                total_disk_mb: disk,
                free_cpus: u32::try_from(share(cpus.into(), pct.0))
                    .unwrap_or(cpus),
                free_memory_mb: u32::try_from(share(mem.into(), pct.1))
                    .unwrap_or(mem),
                free_disk_mb: share(disk, pct.2),
                templates: tpl.into_iter().map(String::from).collect(),
                warm: warm.into_iter().map(String::from).collect(),
                orgs: (0..n.0).map(|i| (format!("o{i}"), i + 1)).collect(),
                paid: n.1,
                free: n.2,
            }
        })
}

fn arb_demand() -> impl Strategy<Value = Demand> {
    (
        (1u32..16, 1u32..(32 * GIB), 1u64..(1 << 17)),
        prop::sample::select(vec!["base", "python", "node"]),
        (0u32..4, any::<bool>()),
        (
            prop::option::of(prop::sample::select(vec![
                Arch::Amd64,
                Arch::Arm64,
            ])),
            prop::option::of(prop::sample::select(vec![
                Accel::Kvm,
                Accel::Tcg,
            ])),
            prop::option::of(0usize..12),
        ),
    )
        .prop_map(|(size, tpl, (org, paid), (arch, accel, pref))| {
            Demand {
                cpus: size.0,
                memory_mb: size.1,
                disk_mb: size.2,
                template: tpl.into(),
                org: format!("o{org}"),
                tier: if paid { Tier::Paid } else { Tier::Free },
                arch,
                accel,
                prefer_worker: pref.map(|i| format!("w{i:02}")),
            }
        })
}

fn arb_weights() -> impl Strategy<Value = Weights> {
    let w = || 0.0..=crate::weights::MAX_WEIGHT;
    let usual = (0u32..8, 0u32..8192, 0u64..8192, 0.0..10.0f64).prop_map(
        |(cpus, memory_mb, disk_mb, share)| crate::weights::Usual {
            cpus,
            memory_mb,
            disk_mb,
            share,
        },
    );
    (
        (w(), w(), w(), w()),
        (w(), w(), w(), w()),
        prop::collection::vec(usual, 0..5),
    )
        .prop_map(
            |((pack, frag, balance, warmth), (aff, anti, pref, sc), mix)| {
                Weights {
                    pack,
                    frag,
                    balance,
                    warmth,
                    affinity: aff,
                    anti_affinity: anti,
                    prefer_worker: pref,
                    scarcity: sc,
                    mix,
                }
            },
        )
}

fn cell() -> impl Strategy<Value = Vec<Candidate>> {
    prop::collection::vec(arb_candidate(), 0..12).prop_map(|mut ws| {
        for (i, w) in ws.iter_mut().enumerate() {
            w.id = format!("w{i:02}");
        }
        ws
    })
}

proptest! {
    #[test]
    fn places_exactly_where_it_fits(
        ws in cell(), d in arb_demand(), w in arb_weights(),
    ) {
        let decision = decide(&ws, &d, &w);
        // Never where it does not fit or breaks a hard constraint.
        for id in &decision.order {
            let c = ws.iter().find(|c| &c.id == id);
            prop_assert!(c.is_some_and(|c| c.check(&d).is_ok()));
        }
        // Never rejects while a healthy, non-draining worker fits.
        let fitting = ws.iter().filter(|c| c.check(&d).is_ok()).count();
        prop_assert_eq!(decision.order.len(), fitting);
        // Every candidate is explained, once.
        let mut seen: Vec<_> =
            decision.verdicts.iter().map(|v| v.worker.clone()).collect();
        seen.sort();
        let mut ids: Vec<_> = ws.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        prop_assert_eq!(seen, ids);
    }

    #[test]
    fn the_order_is_by_score_then_id_and_finite(
        ws in cell(), d in arb_demand(), w in arb_weights(),
    ) {
        let decision = decide(&ws, &d, &w);
        let scores: Vec<(f64, &str)> = decision.verdicts.iter()
            .filter_map(|v| match &v.outcome {
                Outcome::Scored(s) => Some((s.total, v.worker.as_str())),
                Outcome::Rejected(_) => None,
            })
            .collect();
        prop_assert!(scores.iter().all(|(s, _)| s.is_finite()));
        for pair in scores.windows(2) {
            let ((s0, a), (s1, b)) = (pair[0], pair[1]);
            prop_assert!(s0 > s1 || (s0 == s1 && a < b));
        }
        let ids: Vec<&str> = scores.iter().map(|(_, id)| *id).collect();
        prop_assert_eq!(ids, decision.order.iter().map(String::as_str)
            .collect::<Vec<_>>());
    }

    #[test]
    fn decide_top_agrees_with_decide(
        ws in cell(), d in arb_demand(), w in arb_weights(), k in 0usize..6,
    ) {
        let full = decide(&ws, &d, &w);
        let top = decide_top(&ws, &d, &w, k);
        // Never where it does not fit, never rejects while one fits.
        for id in &top.order {
            let c = ws.iter().find(|c| c.id == *id);
            prop_assert!(c.is_some_and(|c| c.check(&d).is_ok()));
        }
        let fitting = ws.iter().filter(|c| c.check(&d).is_ok()).count();
        prop_assert_eq!(top.order.len(), fitting);
        // The same order and scores as the full decision.
        prop_assert_eq!(&top.order, &full.order);
        prop_assert_eq!(&top.top[..], &full.verdicts[..k.min(fitting)]);
        // Every rejection counted once, under its reason.
        let mut counted = Rejected::default();
        for v in &full.verdicts {
            if let Outcome::Rejected(why) = &v.outcome {
                let n = match why {
                    Rejection::Unhealthy => &mut counted.unhealthy,
                    Rejection::Draining => &mut counted.draining,
                    Rejection::Arch { .. } => &mut counted.arch,
                    Rejection::Accel { .. } => &mut counted.accel,
                    Rejection::TemplateMissing { .. } => {
                        &mut counted.template_missing
                    }
                    Rejection::Short { .. } => &mut counted.short,
                };
                *n += 1;
            }
        }
        prop_assert_eq!(top.rejected, counted);
        prop_assert_eq!(
            top.rejected.total() as usize + fitting, ws.len()
        );
    }

    #[test]
    fn the_input_order_does_not_matter(
        ws in cell(), d in arb_demand(), w in arb_weights(),
    ) {
        let mut rev = ws.clone();
        rev.reverse();
        prop_assert_eq!(decide(&ws, &d, &w), decide(&rev, &d, &w));
    }
}
