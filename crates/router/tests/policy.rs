//! Table-driven tests of the routing policy: every rule, ties, fallbacks, unknown names,
//! nothing ready.

use silica_engine::registry::Tier;
use silica_router::policy::{choose, Candidate, CandidateStatus, Priority, RouteError, RouteRequest, RouterConfig};

const SMALL: u64 = 494_000_000;
const LARGE: u64 = 1_540_000_000;

fn fast() -> Candidate {
    Candidate { aliases: vec!["qwen-0.5b".into(), "demo".into()], ..Candidate::ready_idle("fast", Some(Tier::Speed), SMALL) }
}
fn strong() -> Candidate {
    Candidate { aliases: vec!["qwen-1.5b".into()], ..Candidate::ready_idle("strong", Some(Tier::Quality), LARGE) }
}
fn busy(mut c: Candidate, running: usize, waiting: usize) -> Candidate {
    c.running = running;
    c.waiting = waiting;
    c
}
fn with_status(mut c: Candidate, s: CandidateStatus) -> Candidate {
    c.status = s;
    c
}
fn overloaded(mut c: Candidate) -> Candidate {
    c.overloaded = true;
    c
}
fn req(model: Option<&'static str>, priority: Option<Priority>, max_tokens: Option<usize>) -> RouteRequest<'static> {
    RouteRequest { model, priority, max_tokens, prompt_tokens_hint: 0 }
}

#[test]
fn policy_table() {
    use Priority::*;
    let cfg = RouterConfig::default();
    // (case, models, request, expected model name, a word the reason must contain)
    let cases: Vec<(&str, Vec<Candidate>, RouteRequest, &str, &str)> = vec![
        ("speed → the fast tier", vec![strong(), fast()], req(None, Some(Speed), Some(50)), "fast", "speed"),
        ("quality → the quality tier", vec![fast(), strong()], req(None, Some(Quality), Some(50)), "strong", "quality"),
        ("long generation → fast even for quality", vec![fast(), strong()], req(None, Some(Quality), Some(300)), "fast", "long generation"),
        ("exactly the threshold is not long", vec![fast(), strong()], req(None, Some(Quality), Some(200)), "strong", "quality"),
        ("explicit name wins over priority", vec![fast(), strong()], req(Some("strong"), Some(Speed), Some(300)), "strong", "by name"),
        ("alias", vec![fast(), strong()], req(Some("demo"), Some(Quality), None), "fast", "by name"),
        ("auto lets the policy choose", vec![fast(), strong()], req(Some("auto"), Some(Quality), None), "strong", "quality"),
        ("balanced idle → the quicker model", vec![strong(), fast()], req(None, Some(Balanced), Some(100)), "fast", "balanced"),
        ("no priority = balanced", vec![strong(), fast()], req(None, None, Some(100)), "fast", "balanced"),
        ("balanced moves away from a loaded model", vec![busy(fast(), 16, 8), strong()], req(None, Some(Balanced), Some(100)), "strong", "balanced"),
        ("balanced uses measured latency", vec![Candidate { itl_ms: 500.0, ..fast() }, Candidate { itl_ms: 40.0, ..strong() }], req(None, None, Some(100)), "strong", "balanced"),
        ("speed tie → fewer parameters", vec![Candidate::ready_idle("b", None, LARGE), Candidate::ready_idle("a", None, SMALL)], req(None, Some(Speed), None), "a", "speed"),
        ("quality tie → more parameters", vec![Candidate::ready_idle("a", None, SMALL), Candidate::ready_idle("b", None, LARGE)], req(None, Some(Quality), None), "b", "quality"),
        ("full tie → registry order", vec![Candidate::ready_idle("first", None, SMALL), Candidate::ready_idle("second", None, SMALL)], req(None, Some(Balanced), None), "first", "balanced"),
        ("untiered sits between the tiers", vec![strong(), Candidate::ready_idle("plain", None, LARGE)], req(None, Some(Speed), None), "plain", "speed"),
        ("failed quality model → the fast one serves", vec![fast(), with_status(strong(), CandidateStatus::Failed("oom".into()))], req(None, Some(Quality), None), "fast", "quality"),
        ("loading model is skipped", vec![with_status(fast(), CandidateStatus::Loading), strong()], req(None, Some(Speed), None), "strong", "speed"),
        ("overloaded choice falls back", vec![overloaded(fast()), strong()], req(None, Some(Speed), None), "strong", "fell back"),
        ("context too small is skipped", vec![Candidate { context_length: 1024, ..fast() }, strong()], RouteRequest { prompt_tokens_hint: 900, ..req(None, Some(Speed), Some(200)) }, "strong", "speed"),
    ];
    for (case, models, r, want, reason) in cases {
        let d = choose(&cfg, &models, &r).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_eq!(models[d.index].name, want, "{case}: {}", d.reason);
        assert!(d.reason.contains(reason), "{case}: reason {:?} lacks {reason:?}", d.reason);
    }
}

#[test]
fn policy_refusals() {
    let cfg = RouterConfig::default();
    let e = choose(&cfg, &[fast(), strong()], &req(Some("gpt-9"), None, None)).unwrap_err();
    assert_eq!(e, RouteError::UnknownModel { name: "gpt-9".into(), known: vec!["fast".into(), "strong".into()] });
    let e = choose(&cfg, &[fast(), with_status(strong(), CandidateStatus::Loading)], &req(Some("strong"), None, None)).unwrap_err();
    assert!(matches!(&e, RouteError::NotReady { name, status } if name == "strong" && status.contains("loading")), "{e}");
    let failed = [with_status(fast(), CandidateStatus::Failed("disk".into())), with_status(strong(), CandidateStatus::Failed("oom".into()))];
    let e = choose(&cfg, &failed, &req(None, None, None)).unwrap_err();
    assert!(matches!(&e, RouteError::NoneReady { detail } if detail.contains("disk") && detail.contains("oom")), "{e}");
    assert!(matches!(choose(&cfg, &[], &req(None, None, None)), Err(RouteError::NoneReady { .. })));
    let e = choose(&cfg, &[overloaded(fast()), overloaded(strong())], &req(None, Some(Priority::Speed), None)).unwrap_err();
    assert_eq!(e, RouteError::Overloaded);
    let no_fallback = RouterConfig { fallback: false, ..RouterConfig::default() };
    let e = choose(&no_fallback, &[overloaded(fast()), strong()], &req(None, Some(Priority::Speed), None)).unwrap_err();
    assert_eq!(e, RouteError::Overloaded);
    // An explicit name is never substituted, even when that model is overloaded: the engine's
    // own refusal (429) reaches the client.
    let d = choose(&cfg, &[overloaded(fast()), strong()], &req(Some("fast"), None, None)).unwrap();
    assert_eq!(d.index, 0);
    let e = choose(&cfg, &[Candidate { context_length: 512, ..fast() }], &RouteRequest { prompt_tokens_hint: 400, ..req(None, None, Some(200)) }).unwrap_err();
    assert_eq!(e, RouteError::TooLong { needed: 600, largest: 512 });
}

#[test]
fn router_settings_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(&p, "[router]\nlong_generation_tokens = 300\ndefault_priority = \"quality\"\n").unwrap();
    let c = RouterConfig::from_file(&p).unwrap();
    assert_eq!((c.long_generation_tokens, c.default_priority), (300, Priority::Quality));
    std::fs::write(&p, "[router]\nlong_tokens = 300\n").unwrap();
    let e = RouterConfig::from_file(&p).unwrap_err();
    assert!(e.contains("s.toml") && e.contains("long_tokens"), "{e}");
    std::fs::write(&p, "[router]\nlong_generation_tokens = 0\n").unwrap();
    assert!(RouterConfig::from_file(&p).unwrap_err().contains("long_generation_tokens"));
}
