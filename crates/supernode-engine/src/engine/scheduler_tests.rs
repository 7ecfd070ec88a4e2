//! Scheduler unit tests: no model, no tensors. Each test drives the scheduler as the engine
//! does (schedule, update, append the sampled token) and checks the plans.

use super::*;

fn scheduler(max_num_seqs: usize, budget: usize, num_blocks: usize) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        max_num_seqs,
        max_num_batched_tokens: budget,
        num_blocks,
        prefix_caching: true,
        salt: String::new(),
        state_slots: 0,
    })
}

fn add(s: &mut Scheduler, id: u64, prompt: Vec<u32>) -> RequestId {
    add_salted(s, id, prompt, None)
}

fn add_salted(s: &mut Scheduler, id: u64, prompt: Vec<u32>, salt: Option<&str>) -> RequestId {
    let id = RequestId(id);
    s.add(NewRequest {
        id,
        prompt,
        cache_salt: salt.map(str::to_string),
        prompt_logits: false,
    });
    id
}

/// One engine step without a model: every sampled request gets token 7.
fn step(s: &mut Scheduler) -> Plan {
    let plan = s.schedule();
    s.update(&plan);
    for sc in &plan.scheduled {
        if sc.sample {
            s.append(sc.id, 7);
        }
    }
    plan
}

/// (id, tokens computed, sampled) of each scheduled request.
fn shape(plan: &Plan) -> Vec<(u64, usize, bool)> {
    plan.scheduled
        .iter()
        .map(|sc| (sc.id.0, sc.tokens.len(), sc.sample))
        .collect()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| seed * 1000 + i).collect()
}

#[test]
fn the_token_budget_splits_prompts_into_chunks() {
    let mut s = scheduler(4, 32, 64);
    add(&mut s, 1, prompt(1, 40));
    add(&mut s, 2, prompt(2, 40));
    // The first request takes the whole budget; the second is not admitted yet.
    let p = step(&mut s);
    assert_eq!(shape(&p), vec![(1, 32, false)]);
    assert_eq!(p.admitted.len(), 1);
    assert_eq!(s.num_waiting(), 1);
    // The first finishes its prompt and is sampled; the second starts with what is left.
    let p = step(&mut s);
    assert_eq!(shape(&p), vec![(1, 8, true), (2, 24, false)]);
    assert_eq!(p.scheduled[0].start, 32);
    // Decode (one token) beside the rest of the second prompt.
    let p = step(&mut s);
    assert_eq!(shape(&p), vec![(1, 1, true), (2, 16, true)]);
    assert_eq!(p.num_tokens(), 17);
    assert_eq!(p.scheduled[0].tokens, vec![7]);
    assert_eq!(p.scheduled[0].start, 40);
}

#[test]
fn the_sequence_limit_holds_admission_back() {
    let mut s = scheduler(1, 256, 64);
    add(&mut s, 1, prompt(1, 5));
    add(&mut s, 2, prompt(2, 5));
    assert_eq!(shape(&step(&mut s)), vec![(1, 5, true)]);
    assert_eq!(shape(&step(&mut s)), vec![(1, 1, true)]);
    s.remove(RequestId(1));
    assert_eq!(shape(&step(&mut s)), vec![(2, 5, true)]);
}

#[test]
fn block_tables_cover_what_is_computed() {
    let mut s = scheduler(2, 20, 64);
    add(&mut s, 1, prompt(1, 50));
    for want in [2, 3, 4] {
        let p = step(&mut s);
        let sc = &p.scheduled[0];
        assert!(sc.block_table.len() * BLOCK_SIZE >= sc.start + sc.tokens.len());
        assert_eq!(sc.block_table.len(), want);
    }
}

#[test]
fn prefix_hits_count_as_computed() {
    let mut s = scheduler(4, 256, 64);
    let p = prompt(1, 70);
    add(&mut s, 1, p.clone());
    step(&mut s);
    s.remove(RequestId(1));
    assert_eq!(s.pool().num_in_use(), 0);
    // Four full blocks are cached: the same prompt computes only the rest.
    add(&mut s, 2, p.clone());
    let plan = step(&mut s);
    assert_eq!(
        plan.admitted,
        vec![Admitted {
            id: RequestId(2),
            cached_tokens: 64
        }]
    );
    assert_eq!(shape(&plan), vec![(2, 6, true)]);
    assert_eq!(plan.scheduled[0].start, 64);
    // A prompt that is exactly four blocks still computes its last token.
    add(&mut s, 3, p[..64].to_vec());
    let plan = step(&mut s);
    assert_eq!(plan.admitted[0].cached_tokens, 48);
}

#[test]
fn requests_with_prompt_logits_compute_every_position() {
    let mut s = scheduler(4, 256, 64);
    let p = prompt(1, 40);
    add(&mut s, 1, p.clone());
    step(&mut s);
    s.remove(RequestId(1));
    s.add(NewRequest {
        id: RequestId(2),
        prompt: p,
        cache_salt: None,
        prompt_logits: true,
    });
    let plan = step(&mut s);
    assert_eq!(plan.admitted[0].cached_tokens, 0);
    assert_eq!(plan.scheduled[0].prompt_rows, 0..40);
    assert_eq!(plan.scheduled[0].logits_rows(), 0..40);
}

#[test]
fn preemption_sends_the_newest_back_and_it_resumes() {
    // 4 blocks: two requests of 20 tokens hold 2 blocks each; the next token needs a third.
    let mut s = scheduler(4, 256, 4);
    add(&mut s, 1, prompt(1, 30));
    add(&mut s, 2, prompt(2, 30));
    let p = step(&mut s);
    assert_eq!(shape(&p), vec![(1, 30, true), (2, 30, true)]);
    assert_eq!(s.pool().num_free(), 0);
    // Both decode at position 30 and 31 inside their second block.
    step(&mut s);
    step(&mut s);
    // Position 32 needs a third block: request 2 (the newest) gives its blocks back.
    let p = step(&mut s);
    assert_eq!(p.preempted, vec![RequestId(2)]);
    assert_eq!(shape(&p), vec![(1, 1, true)]);
    assert_eq!(s.num_waiting(), 1);
    // When request 1 finishes, request 2 recomputes its prompt and the three tokens it
    // generated. Its blocks went back tail first, so request 1's growth evicted its second
    // block and its first is still cached.
    s.remove(RequestId(1));
    let p = step(&mut s);
    assert_eq!(shape(&p), vec![(2, 17, true)]);
    assert_eq!(p.scheduled[0].start, 16);
    assert!(
        p.admitted.is_empty(),
        "a resumed request is not admitted twice"
    );
    assert_eq!(&p.scheduled[0].tokens[14..], &[7, 7, 7]);
}

#[test]
fn a_request_alone_that_cannot_grow_is_out_of_room() {
    let mut s = scheduler(2, 256, 2);
    add(&mut s, 1, prompt(1, 31));
    step(&mut s);
    step(&mut s);
    // Position 32 needs a third block, and nobody else can give one back.
    let p = step(&mut s);
    assert_eq!(
        p.out_of_room,
        vec![OutOfRoom {
            id: RequestId(1),
            was_admitted: true
        }]
    );
    assert!(p.scheduled.is_empty());
    assert!(s.is_idle());
    assert_eq!(s.pool().num_in_use(), 0);
    // A prompt longer than the whole cache, with nothing running, is out of room at once.
    add(&mut s, 2, prompt(2, 40));
    let p = step(&mut s);
    assert_eq!(
        p.out_of_room,
        vec![OutOfRoom {
            id: RequestId(2),
            was_admitted: false
        }]
    );
}

#[test]
fn cancellation_returns_the_blocks() {
    let mut s = scheduler(4, 16, 16);
    add(&mut s, 1, prompt(1, 50));
    add(&mut s, 2, prompt(2, 50));
    step(&mut s);
    assert!(s.pool().num_in_use() > 0);
    assert_eq!(s.remove(RequestId(1)), Some(true));
    assert_eq!(s.remove(RequestId(2)), Some(false));
    assert_eq!(s.remove(RequestId(2)), None);
    assert_eq!(s.pool().num_in_use(), 0);
    assert!(s.is_idle());
}

/// The pool fills so that eviction must happen; the chain's tail goes first, so the longest
/// shared prefix that could survive still hits.
#[test]
fn eviction_takes_the_tail_of_a_chain_first() {
    let mut s = scheduler(2, 256, 8);
    let shared = prompt(1, 65);
    add(&mut s, 1, shared.clone());
    step(&mut s);
    s.remove(RequestId(1));
    // Blocks 0..4 are cached (block 4 holds the last token and one more, never full).
    assert_eq!(s.pool().num_cached(), 4);
    // Another prompt needs 6 blocks: 4 plain ones, then two evicted.
    add(&mut s, 2, prompt(2, 90));
    step(&mut s);
    s.remove(RequestId(2));
    // The two evicted are the tail (blocks 3 and 2): the first two blocks still hit.
    add(&mut s, 3, shared);
    let p = step(&mut s);
    assert_eq!(p.admitted[0].cached_tokens, 32);
}

#[test]
fn different_cache_salts_share_nothing() {
    let mut s = scheduler(4, 256, 64);
    let p = prompt(1, 50);
    add_salted(&mut s, 1, p.clone(), Some("tenant-a"));
    step(&mut s);
    s.remove(RequestId(1));
    add_salted(&mut s, 2, p.clone(), Some("tenant-b"));
    assert_eq!(step(&mut s).admitted[0].cached_tokens, 0);
    s.remove(RequestId(2));
    add(&mut s, 3, p.clone());
    assert_eq!(step(&mut s).admitted[0].cached_tokens, 0);
    s.remove(RequestId(3));
    add_salted(&mut s, 4, p, Some("tenant-a"));
    assert_eq!(step(&mut s).admitted[0].cached_tokens, 48);
}

#[test]
fn a_deployment_salt_keys_every_hash() {
    let mut a = scheduler(1, 256, 8);
    let mut b = Scheduler::new(SchedulerConfig {
        salt: "deployment-b".into(),
        state_slots: 0,
        ..a.config().clone()
    });
    for s in [&mut a, &mut b] {
        add(s, 1, prompt(1, 20));
        step(s);
    }
    let first = |s: &Scheduler| s.running[0].hashes[0];
    assert_ne!(first(&a), first(&b));
    assert_eq!(
        first(&a),
        block_hash(&root_hash("", ""), &prompt(1, 20)[..BLOCK_SIZE])
    );
}

/// One verification step: schedules, then appends `sampled` (the engine's kept tokens) and
/// accepts the drafts among them that match.
fn verify(s: &mut Scheduler, id: RequestId, sampled: &[u32]) -> Plan {
    let plan = s.schedule();
    s.update(&plan);
    let sc = plan.scheduled.iter().find(|sc| sc.id == id).unwrap();
    let drafts = sc.tokens[sc.tokens.len() - sc.drafts..].to_vec();
    for &t in sampled {
        s.append(id, t);
    }
    let accepted = drafts
        .iter()
        .zip(sampled)
        .take_while(|(d, t)| d == t)
        .count();
    if sc.drafts > 0 {
        s.accept_drafts(id, accepted);
    }
    plan
}

#[test]
fn drafts_ride_after_the_last_token_and_rejected_ones_give_their_blocks_back() {
    let mut s = scheduler(4, 64, 8);
    let a = add(&mut s, 1, prompt(1, 14));
    step(&mut s);
    // 15 tokens, 14 computed: the last sampled token and five drafts, over two blocks.
    assert_eq!(
        s.decoding()
            .map(|(id, t)| (id, t.len()))
            .collect::<Vec<_>>(),
        vec![(a, 15)]
    );
    s.set_drafts(a, &[20, 21, 22, 23, 24]);
    let p = verify(&mut s, a, &[20, 21, 9]);
    let sc = &p.scheduled[0];
    assert_eq!(
        (sc.start, sc.tokens.len(), sc.drafts, sc.sample),
        (14, 6, 5, true)
    );
    assert_eq!(sc.tokens, vec![7, 20, 21, 22, 23, 24]);
    assert_eq!(sc.logits_rows(), 0..6);
    assert_eq!(sc.block_table.len(), 2);
    // Two drafts were accepted: 17 computed, 18 tokens, the last (9) is next.
    assert_eq!(s.tokens(a).unwrap()[14..], [7, 20, 21, 9]);
    assert_eq!(s.decoding().count(), 1);
    let p = step(&mut s);
    assert_eq!(
        (p.scheduled[0].start, p.scheduled[0].tokens.clone()),
        (17, vec![9])
    );
    // Only the first full block (16 accepted tokens) is in the prefix cache.
    assert_eq!(s.pool().num_cached(), 1);
    // A verification that rejects everything gives back the block only drafts reached.
    s.set_drafts(a, &[30; 14]);
    assert_eq!(s.pool().num_in_use(), 2);
    let p = verify(&mut s, a, &[31]);
    assert_eq!(p.scheduled[0].block_table.len(), 3);
    assert_eq!(s.pool().num_in_use(), 2);
    assert_eq!(s.tokens(a).unwrap().len(), 20);
    let p = step(&mut s);
    assert_eq!((p.scheduled[0].start, p.scheduled[0].drafts), (19, 0));
}

#[test]
fn drafts_yield_to_the_budget_the_pool_and_prefills() {
    // The budget: the other request's decode comes first; drafts get what is left.
    let mut s = scheduler(4, 4, 64);
    let a = add(&mut s, 1, prompt(1, 3));
    let b = add(&mut s, 2, prompt(2, 1));
    step(&mut s);
    s.set_drafts(a, &[1, 2, 3, 4, 5]);
    s.set_drafts(b, &[6, 7, 8, 9, 10]);
    let p = s.schedule();
    let shape = |p: &Plan| {
        p.scheduled
            .iter()
            .map(|sc| (sc.id, sc.tokens.len(), sc.drafts))
            .collect::<Vec<_>>()
    };
    assert_eq!(shape(&p), vec![(a, 3, 2), (b, 1, 0)]);
    // A request still prefilling takes no drafts.
    let mut s = scheduler(4, 8, 64);
    let c = add(&mut s, 3, prompt(3, 20));
    s.schedule();
    s.set_drafts(c, &[1, 2]);
    assert_eq!(s.decoding().count(), 0);
    // The pool: no block for the drafts, so none are verified (and nothing is preempted).
    let mut s = scheduler(4, 64, 1);
    let d = add(&mut s, 4, prompt(4, 15));
    step(&mut s);
    s.set_drafts(d, &[1, 2, 3]);
    let p = s.schedule();
    assert_eq!((p.scheduled[0].tokens.len(), p.scheduled[0].drafts), (1, 0));
    assert!(p.preempted.is_empty() && p.out_of_room.is_empty());
}

/// Recurrent state slots (hybrid models): a running request holds one; a request waits while
/// none is free; removal and preemption give it back (a preempted request recomputes from
/// position 0); no block is ever found in the prefix cache.
#[test]
fn state_slots_are_held_while_running_and_returned() {
    let mut s = Scheduler::new(SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
        num_blocks: 6,
        prefix_caching: true,
        salt: String::new(),
        state_slots: 2,
    });
    let prompt: Vec<u32> = (0..20).collect();
    let a = add(&mut s, 1, prompt.clone());
    let b = add(&mut s, 2, prompt.clone());
    let c = add(&mut s, 3, prompt.clone());
    let plan = step(&mut s);
    let slots: Vec<Option<usize>> = plan.scheduled.iter().map(|x| x.state_slot).collect();
    assert_eq!(slots, [Some(0), Some(1)]);
    assert_eq!(
        (s.num_running(), s.num_waiting(), s.free_state_slots()),
        (2, 1, 0)
    );
    s.remove(a);
    assert_eq!(s.free_state_slots(), 1);
    // The third request takes the freed slot and computes its whole prompt: the same tokens
    // as the first were registered nowhere.
    let plan = step(&mut s);
    let third = plan.scheduled.iter().find(|x| x.id == c).unwrap();
    assert_eq!((third.start, third.state_slot), (0, Some(0)));
    assert_eq!(
        plan.admitted
            .iter()
            .find(|x| x.id == c)
            .unwrap()
            .cached_tokens,
        0
    );
    // Grow both until the 6 blocks run out: the newer one is preempted, gives its slot back,
    // and is later recomputed from position 0.
    let mut preempted = false;
    for _ in 0..80 {
        let plan = step(&mut s);
        if plan.preempted.contains(&c) {
            preempted = true;
            assert_eq!(s.free_state_slots(), 1);
        }
        if preempted {
            if let Some(x) = plan.scheduled.iter().find(|x| x.id == c) {
                assert_eq!(x.start, 0);
                assert!(x.state_slot.is_some());
                break;
            }
        }
    }
    assert!(preempted);
    s.remove(b);
    s.remove(c);
    assert_eq!(s.free_state_slots(), 2);
}

/// With state slots (a hybrid model), prompts are cut only at multiples of the linear-attention
/// window, whatever the budget leaves: a 250-token prompt under a budget of 100 goes in 64,
/// 64, 64 and 58 tokens (the rest fits); beside a decoding request, a newcomer whose next window does not fit
/// waits for the next step; a budget below one window cuts anywhere (so it never stalls).
#[test]
fn hybrid_prompts_are_cut_at_window_boundaries() {
    let w = DELTA_CHUNK;
    let hybrid = |budget| {
        Scheduler::new(SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: budget,
            num_blocks: 64,
            prefix_caching: true,
            salt: String::new(),
            state_slots: 4,
        })
    };
    let mut s = hybrid(100);
    let a = add(&mut s, 1, (0..250).collect());
    let spans = |plan: &Plan| -> Vec<(RequestId, usize, usize)> {
        plan.scheduled
            .iter()
            .map(|x| (x.id, x.start, x.tokens.len()))
            .collect()
    };
    assert_eq!(spans(&step(&mut s)), [(a, 0, w)]);
    assert_eq!(spans(&step(&mut s)), [(a, w, w)]);
    assert_eq!(spans(&step(&mut s)), [(a, 2 * w, w)]);
    assert_eq!(spans(&step(&mut s)), [(a, 3 * w, 250 - 3 * w)]);
    // `a` decodes one token a step; `b` gets 99 of the budget, cut to 64, then the rest.
    let b = add(&mut s, 2, (0..100).collect());
    assert_eq!(spans(&step(&mut s)), [(a, 250, 1), (b, 0, w)]);
    assert_eq!(spans(&step(&mut s)), [(a, 251, 1), (b, w, 100 - w)]);
    // Two decoders leave 62 of a budget of 64: the newcomer waits rather than cut mid-window.
    let mut s = hybrid(w);
    let (c, d) = (add(&mut s, 3, vec![1]), add(&mut s, 4, vec![2]));
    step(&mut s);
    let e = add(&mut s, 5, (0..80).collect());
    assert_eq!(spans(&step(&mut s)), [(c, 1, 1), (d, 1, 1)]);
    assert_eq!(s.num_waiting(), 1);
    s.remove(c);
    s.remove(d);
    assert_eq!(spans(&step(&mut s)), [(e, 0, w)]);
    assert_eq!(spans(&step(&mut s)), [(e, w, 80 - w)]);
    // A budget smaller than a window: any cut.
    let mut s = hybrid(10);
    let f = add(&mut s, 6, (0..30).collect());
    assert_eq!(spans(&step(&mut s)), [(f, 0, 10)]);
}
