/*
 * replication.pml: a Promela model of mailwal's log-shipping replication,
 * soft failover, hard failover and the keeping aside of a diverged tail.
 *
 * Read specs/replication-model.md first: it says what is abstracted, how the
 * names map onto specs/replication.md (REP-n, INV-...) and engine/, and what
 * each BUG_ switch breaks. Check it with
 *
 *     spin -a replication.pml && gcc -O2 -DNOREDUCE -o pan pan.c && ./pan -a -m100000
 *
 * (tests/replication/test_spin_model.py does this in a temporary directory, and again
 * with each -DBUG_... switch, which must make spin report an error).
 *
 * One process, `cluster`, runs forever choosing an enabled action, TLA+ style:
 * every action is one atomic step with a guard. A second process, `monitor`,
 * asserts the invariants in every reachable state.
 */

#ifndef N
#define N 3            /* nodes; node 0 starts as master, the others as replicas */
#endif
#ifndef MAXLEN
#define MAXLEN 3       /* log length bound (LSNs 1..MAXLEN) */
#endif
#ifndef MAXID
#define MAXID 2        /* client writes (message GUIDs 1..MAXID); at most 7 */
#endif
#ifndef MAXSOFT
#define MAXSOFT 1      /* soft failovers started */
#endif
#ifndef MAXHARD
#define MAXHARD 1      /* hard failovers (forced promotions of a replica) */
#endif
#ifndef MAXCRASH
#define MAXCRASH 1     /* node crashes (power loss: what is not fdatasynced is gone) */
#endif
#ifndef MAXBREAK
#define MAXBREAK 1     /* connections broken by the network at an arbitrary point */
#endif

#define NONE 255
#define MAXSLOT (1 + MAXSOFT + MAXHARD)   /* masters ever: the first one and one per promotion */

/* A record is one byte: epoch * 16 + id. Ids 1..7 are client messages (the GUID);
 * id 8 + n is the EpochStarted record written by node n when it is promoted
 * (REC-2; its payload names the node, so two promotions never write equal records).
 * Equal records at every LSN up to k is what "equal hashes at k" means (LOG-5). */
#define REC(e, id)  ((e) * 16 + (id))
#define EPOCH_OF(r) ((r) / 16)
#define ID_OF(r)    ((r) % 16)
#define IS_MESSAGE(r) (ID_OF(r) >= 1 && ID_OF(r) <= 7)
#define EPOCH_STARTED(n) (8 + (n))

/* wire messages (specs/replication.md section 4; fields: two bytes) */
mtype = { Position, Accept, Refuse, AppendBatch, Ack, Fence, Drained, Promote, Promoted };
/* session states (engine.replication.State); CLOSED also means "no connection" */
mtype = { DECIDE, STREAMING, FENCING, DRAINED, PROMOTING, CLOSED };
/* node roles (node.json) */
mtype = { MASTER, REPLICA };
/* Refuse codes (REP-9) */
mtype = { diverged, ahead };

typedef Log {
    byte rec[MAXLEN];
    byte wlen;   /* written */
    byte dlen    /* durable: written and fdatasynced (a crash keeps these only) */
};

Log lg[N];
byte epoch[N];          /* the log's EPOCH file (durable) */
mtype role[N];          /* durable */
bool stuck[N];          /* a replica refused as `ahead` stops until an operator acts */

/* soft failover, on the master handing over */
bool paused[N];         /* pause_writes(): volatile */
bool handing[N];        /* a Promote was sent: writes stay refused until resolved (durable) */
byte fo_target[N];      /* the replica being promoted (kept with handing) */
byte fo_epoch[N];       /* the epoch offered in Promote */

/* One connection per replica r, to master target[r]: two FIFO queues of two
 * messages (TCP: in order, nothing lost or repeated while the connection
 * lives; a break loses everything in flight). Plain arrays rather than chans,
 * so every action's guard is an expression. */
typedef Queue {
    byte m[2];   /* message type (mtype) */
    byte x[2];
    byte y[2];
    byte n
};
byte target[N];
Queue up[N];     /* replica r -> its master */
Queue down[N];   /* master -> replica r */
mtype rs[N];            /* replica-side session state */
mtype ms[N];            /* master-side session state */
byte next_lsn[N];       /* master side: the LSN the next AppendBatch starts with */
byte acked_lsn[N];      /* master side: highest Ack.durable_lsn */
byte fence_lsn[N];      /* master side: Fence.last_lsn sent */
byte drained_lsn[N];    /* master side: Drained.lsn received */
byte r_fence[N];        /* replica side: Fence.last_lsn received */

/* ghost state, for the properties only */
bool acked[8];          /* the client got its answer (LMTP 250 / Node.deliver returned) */
bool aside[8];          /* the message is in a diverged tail kept aside (Node.cut_diverged) */
bool reconciled[8];
Log hist[MAXSLOT];      /* durable log of the k-th master, as it grew */
byte slot[N];           /* which hist entry node n writes while master */
byte nslots = 1;
byte writer[MAXSLOT + 2];  /* per epoch: 1 + the node that wrote in it (0: nobody yet) */
byte next_id = 1;
byte soft = 0;
byte hard = 0;
byte crashes = 0;
byte breaks = 0;

/* scratch: not part of the state vector (only used inside one d_step) */
hidden byte si;
hidden byte sj;
hidden byte sk;
hidden byte st;
hidden byte sfound;
hidden byte sok;
hidden byte sep;
/* the properties, named so that a violation names its property */
hidden byte NoAckedLoss;
hidden byte SoftFailoverLosesNothing;
hidden byte PrefixOfSomeMaster;
hidden byte OneWriterPerEpoch;

/* ---------------------------------------------------------------- helpers */

#define HEAD(q, msg) (q.n > 0 && q.m[0] == (msg))
#define NFULL(q) (q.n < 2)

inline send(q, msg, vx, vy) {
    assert(q.n < 2);
    q.m[q.n] = msg; q.x[q.n] = vx; q.y[q.n] = vy;
    q.n++
}

inline recv(q, vx, vy) {
    /* take the head message (its type was checked with HEAD) */
    vx = q.x[0]; vy = q.y[0];
    q.m[0] = q.m[1]; q.x[0] = q.x[1]; q.y[0] = q.y[1];
    q.m[1] = 0; q.x[1] = 0; q.y[1] = 0;
    q.n--
}

inline flush(q) {
    q.m[0] = 0; q.x[0] = 0; q.y[0] = 0;
    q.m[1] = 0; q.x[1] = 0; q.y[1] = 0;
    q.n = 0
}

inline copy_hist(n) {
    /* hist[slot[n]] := the durable log of master n */
    si = 0;
    do
    :: si < lg[n].dlen -> hist[slot[n]].rec[si] = lg[n].rec[si]; si++
    :: else -> break
    od;
    hist[slot[n]].wlen = lg[n].dlen;
    hist[slot[n]].dlen = lg[n].dlen;
    si = 0
}

inline note_write(n, e) {
    /* (3) OneWriterPerEpoch: under soft failover only one master writes in an epoch */
    OneWriterPerEpoch = (hard > 0 || writer[e] == 0 || writer[e] == n + 1);
    assert(OneWriterPerEpoch);
    writer[e] = n + 1
}

inline common_prefix(a, b, limit, res) {
    /* the last common LSN of lg[a] and lg[b] up to limit (REP-8, by the chain property) */
    res = 0;
    do
    :: res < limit && lg[a].rec[res] == lg[b].rec[res] -> res++
    :: else -> break
    od
}

inline holds(n, id, res) {
    /* the durable log of n holds message id */
    res = false;
    sj = 0;
    do
    :: sj < lg[n].dlen -> if :: ID_OF(lg[n].rec[sj]) == id -> res = true :: else -> skip fi; sj++
    :: else -> break
    od;
    sj = 0
}

inline has(n, id, res) {
    /* the log of n, written or durable, holds message id: "it is there now" */
    res = false;
    sj = 0;
    do
    :: sj < lg[n].wlen -> if :: ID_OF(lg[n].rec[sj]) == id -> res = true :: else -> skip fi; sj++
    :: else -> break
    od;
    sj = 0
}

inline close_conn(r) {
    /* the connection of replica r ends: both sessions CLOSED, nothing in flight survives */
    flush(up[r]);
    flush(down[r]);
    if
    :: target[r] != NONE && fo_target[target[r]] == r && !handing[target[r]] ->
        /* soft failover aborted before Promote was sent: the master resumes */
        paused[target[r]] = false; fo_target[target[r]] = NONE
#ifdef BUG_RESUME_AFTER_PROMOTE
    :: target[r] != NONE && fo_target[target[r]] == r && handing[target[r]] ->
        /* engine/cluster/roles.py today: a failure after Promote was sent also resumes as master */
        paused[target[r]] = false; handing[target[r]] = false; fo_target[target[r]] = NONE
#endif
    :: else -> skip
    fi;
    target[r] = NONE; rs[r] = CLOSED; ms[r] = CLOSED;
    next_lsn[r] = 0; acked_lsn[r] = 0; fence_lsn[r] = 0; drained_lsn[r] = 0; r_fence[r] = 0
}

inline drop_replicas_of(m) {
    /* m stops being master: every replication connection to it is closed */
    sk = 0;
    do
    :: sk < N -> if :: target[sk] == m -> close_conn(sk) :: else -> skip fi; sk++
    :: else -> break
    od;
    sk = 0
}

inline become_master(n, e) {
    /* promotion (failover.promote): EPOCH, then the EpochStarted record, durable */
    role[n] = MASTER;
    epoch[n] = e;
    lg[n].rec[lg[n].wlen] = REC(e, EPOCH_STARTED(n));
    lg[n].wlen++;
    lg[n].dlen = lg[n].wlen;
    note_write(n, e);
    slot[n] = nslots;
    nslots++;
    copy_hist(n)
}

/* ------------------------------------------------------------- invariants */

inline check() {
    /* (1) NoAckedLoss: an acknowledged message is on some node or kept aside */
    st = 1;
    do
    :: st <= 7 ->
        if
        :: acked[st] && !aside[st] ->
            sfound = false; sk = 0;
            do
            :: sk < N -> has(sk, st, sok); sfound = sfound || sok; sk++
            :: else -> break
            od;
            sk = 0;
            NoAckedLoss = sfound;
            assert(NoAckedLoss)
        :: else -> skip
        fi;
        st++
    :: else -> break
    od;
    /* (1') SoftFailoverLosesNothing: with soft failovers only, every acknowledged
     * message is on the newest master (nothing ever needs to be kept aside) */
    if
    :: hard == 0 ->
        sk = NONE; si = 0;
        do
        :: si < N -> if :: role[si] == MASTER && (sk == NONE || slot[si] > slot[sk]) -> sk = si :: else -> skip fi; si++
        :: else -> break
        od;
        si = 0;
        assert(sk != NONE);
        st = 1;
        do
        :: st <= 7 ->
            if
            :: acked[st] -> has(sk, st, sok); SoftFailoverLosesNothing = sok; assert(SoftFailoverLosesNothing)
            :: else -> skip
            fi;
            st++
        :: else -> break
        od;
        sk = 0
    :: else -> skip
    fi;
    /* (2) INV-PrefixAgreement: every node's durable log is a prefix of the
     * history of some master (REP-7, INV-NoSilentTruncate) */
    st = 0;
    do
    :: st < N ->
        sfound = false; sk = 0;
        do
        :: sk < nslots && !sfound ->
            if
            :: lg[st].dlen <= hist[sk].wlen ->
                sok = true; sj = 0;
                do
                :: sj < lg[st].dlen -> sok = sok && (lg[st].rec[sj] == hist[sk].rec[sj]); sj++
                :: else -> break
                od;
                sj = 0;
                sfound = sok
            :: else -> skip
            fi;
            sk++
        :: else -> break
        od;
        sk = 0;
        PrefixOfSomeMaster = sfound;
        assert(PrefixOfSomeMaster);
        st++
    :: else -> break
    od;
    st = 0; sfound = false; sok = false
}

/* ---------------------------------------------------------------- actions */

/* Each action is a guard (an expression, CAN_...) and an effect (do_...). A
 * node's actions take its index as a literal (see EACH below), so a disabled
 * action is no transition at all. */

/* -- the master: client writes, group commit --------------------------------------- */

#define CAN_WRITE(a) (role[a] == MASTER && !paused[a] && !handing[a] && lg[a].wlen < MAXLEN && next_id <= MAXID)
inline do_write(a) {
    /* Node.deliver: the record is enqueued, not durable yet */
    lg[a].rec[lg[a].wlen] = REC(epoch[a], next_id);
    lg[a].wlen++;
    note_write(a, epoch[a]);
#ifdef BUG_ACK_BEFORE_DURABLE
    acked[next_id] = true;
#endif
    next_id++
}

#define CAN_SYNC(a) (role[a] == MASTER && lg[a].dlen < lg[a].wlen)
inline do_sync(a) {
    /* the writer's fdatasync returned: the batch is durable, then acknowledged (MS-2) */
    si = lg[a].dlen;
    do
    :: si < lg[a].wlen ->
        if :: IS_MESSAGE(lg[a].rec[si]) -> acked[ID_OF(lg[a].rec[si])] = true :: else -> skip fi;
        si++
    :: else -> break
    od;
    lg[a].dlen = lg[a].wlen;
    copy_hist(a)
}

/* -- faults --------------------------------------------------------------------------------- */

#define CAN_CRASH(a) (crashes < MAXCRASH)
inline do_crash(a) {
    /* power loss and restart: unsynced records vanish, memory is reset; the log,
     * the role, EPOCH and a handover in progress are durable */
    crashes++;
    lg[a].wlen = lg[a].dlen;
    paused[a] = false;
#ifdef BUG_RESUME_AFTER_PROMOTE
    handing[a] = false;   /* the handover lived only in memory */
#endif
    if :: !handing[a] -> fo_target[a] = NONE :: else -> skip fi;
    if :: target[a] != NONE -> close_conn(a) :: else -> skip fi;
    drop_replicas_of(a)
}

#define CAN_BREAK(a) (target[a] != NONE && breaks < MAXBREAK)
inline do_break(a) {
    /* the network breaks the connection anywhere (REP-19, REP-20) */
    breaks++;
    close_conn(a)
}

/* -- placing a replica (REP-6..REP-9) --------------------------------------------------- */

#define CAN_CONNECT(a, b) (role[a] == REPLICA && !stuck[a] && target[a] == NONE && role[b] == MASTER)
inline do_connect(a, b) {
    /* the replica connects and sends its Position (last durable LSN and the hash there) */
    target[a] = b; rs[a] = DECIDE; ms[a] = DECIDE;
    send(up[a], Position, lg[a].wlen, 0)
}

#define CAN_DECIDE(a) (ms[a] == DECIDE && HEAD(up[a], Position))
inline do_decide(a) {
    /* Accept iff the master holds the replica's last record (hash_at(L) == H, REP-7);
     * otherwise the last common LSN (REP-8; the Probe rounds are one step here) and Refuse */
    recv(up[a], si, sj);
    if :: si < lg[target[a]].dlen -> st = si :: else -> st = lg[target[a]].dlen fi;
    common_prefix(a, target[a], st, sk);
#ifdef BUG_ACCEPT_WITHOUT_HASH
    if :: si <= lg[target[a]].dlen -> sk = si :: else -> skip fi;
#endif
    if
    :: sk == si ->
        ms[a] = STREAMING; next_lsn[a] = si + 1; acked_lsn[a] = si;
        send(down[a], Accept, si + 1, 0)
    :: sk != si && sk == lg[target[a]].dlen ->
        ms[a] = CLOSED; send(down[a], Refuse, ahead, sk)
    :: else ->
        ms[a] = CLOSED; send(down[a], Refuse, diverged, sk)
    fi
}

#define CAN_ACCEPTED(a) (rs[a] == DECIDE && HEAD(down[a], Accept))
inline do_accepted(a) {
    recv(down[a], si, sj);
    assert(si == lg[a].wlen + 1);   /* INV-NoSilentTruncate: go on right after what it holds */
    rs[a] = STREAMING
}

#define CAN_REFUSED(a) (rs[a] == DECIDE && HEAD(down[a], Refuse))
inline do_refused(a) {
    recv(down[a], st, sk);
    if
    :: st == diverged ->
        /* Node.cut_diverged: the tail after the last common LSN becomes a log of its
         * own beside the node's (never deleted); then the replica follows again */
        si = sk;
        do
        :: si < lg[a].wlen ->
            if :: IS_MESSAGE(lg[a].rec[si]) -> aside[ID_OF(lg[a].rec[si])] = true :: else -> skip fi;
            si++
        :: else -> break
        od;
        lg[a].wlen = sk; lg[a].dlen = sk
    :: st == ahead ->
        stuck[a] = true   /* ReplicaAheadError: the replica stops, an operator decides */
    fi;
    close_conn(a)
}

/* -- streaming (REP-11, REP-12) ----------------------------------------------------------- */

#ifdef BUG_SHIP_BEFORE_DURABLE
#define SHIPPABLE(a) (next_lsn[a] <= lg[target[a]].wlen)
#else
#define SHIPPABLE(a) (next_lsn[a] <= lg[target[a]].dlen)   /* only durable records are shipped */
#endif
#define CAN_SHIP(a) ((ms[a] == STREAMING || ms[a] == FENCING) && NFULL(down[a]) && SHIPPABLE(a) && \
                     (ms[a] != FENCING || next_lsn[a] <= fence_lsn[a]))   /* REP-14: nothing past the fence */
inline do_ship(a) {
    send(down[a], AppendBatch, next_lsn[a], lg[target[a]].rec[next_lsn[a] - 1]);
    next_lsn[a]++
}

#define CAN_APPEND(a) ((rs[a] == STREAMING || rs[a] == FENCING) && HEAD(down[a], AppendBatch) && NFULL(up[a]))
inline do_append(a) {
    /* Log.append_records: continuity and chain checked, fdatasync, then the Ack */
    recv(down[a], si, sk);
    assert(si == lg[a].wlen + 1);   /* INV-NoGapNoDuplicate */
    lg[a].rec[lg[a].wlen] = sk;
    lg[a].wlen++;
    lg[a].dlen = lg[a].wlen;
    if :: EPOCH_OF(sk) > epoch[a] -> epoch[a] = EPOCH_OF(sk) :: else -> skip fi;
    send(up[a], Ack, lg[a].wlen, 0)   /* INV-NoAckBeforeDurable */
}

#define CAN_ACKED(a) (ms[a] != CLOSED && ms[a] != DECIDE && HEAD(up[a], Ack))
inline do_acked(a) {
    recv(up[a], si, sj);
    assert(si >= acked_lsn[a] && si < next_lsn[a]);   /* REP-12, INV-CursorMonotonic */
    acked_lsn[a] = si
}

/* -- soft failover: pause, fence and drain, promote (REP-14, REP-15) ------------------------- */

#define CAN_HANDOVER(a, b) (role[a] == MASTER && !paused[a] && !handing[a] && soft < MAXSOFT && \
                            target[b] == a && ms[b] == STREAMING)
inline do_handover(a, b) {
    /* walctl failover: Node.pause_writes, then fence and promote b */
    soft++;
    paused[a] = true;
    fo_target[a] = b
}

#define CAN_FENCE(a) (fo_target[a] != NONE && paused[a] && !handing[a] && target[fo_target[a]] == a && \
                      ms[fo_target[a]] == STREAMING && lg[a].wlen == lg[a].dlen && NFULL(down[fo_target[a]]))
inline do_fence(a) {
    /* in-flight writes are durable: Fence{epoch, last_lsn} */
    fence_lsn[fo_target[a]] = lg[a].dlen;
    ms[fo_target[a]] = FENCING;
    send(down[fo_target[a]], Fence, epoch[a], lg[a].dlen)
}

#define CAN_FENCED(a) (rs[a] == STREAMING && HEAD(down[a], Fence))
inline do_fenced(a) {
    recv(down[a], sj, si);
    rs[a] = FENCING; r_fence[a] = si
}

#define CAN_DRAIN(a) (rs[a] == FENCING && lg[a].wlen == r_fence[a] && NFULL(up[a]))
inline do_drain(a) {
    send(up[a], Drained, lg[a].wlen, 0);   /* it holds everything up to the fence */
    rs[a] = DRAINED
}

#define CAN_DRAINED(a) (ms[a] == FENCING && HEAD(up[a], Drained))
inline do_drained(a) {
    recv(up[a], si, sj);
    assert(si == fence_lsn[a]);
    ms[a] = DRAINED; drained_lsn[a] = si
}

#ifdef BUG_PROMOTE_BEFORE_DRAINED
#define READY(a) (ms[fo_target[a]] == STREAMING || ms[fo_target[a]] == DRAINED)
#else
#define READY(a) (ms[fo_target[a]] == DRAINED && drained_lsn[fo_target[a]] == lg[a].dlen)
#endif
#define CAN_PROMOTE(a) (fo_target[a] != NONE && paused[a] && !handing[a] && target[fo_target[a]] == a && \
                        NFULL(down[fo_target[a]]) && READY(a))
inline do_promote(a) {
#ifdef BUG_PROMOTE_SAME_EPOCH
    fo_epoch[a] = epoch[a];
#else
    fo_epoch[a] = epoch[a] + 1;   /* above every epoch of its history */
#endif
    handing[a] = true;   /* durable before Promote leaves */
    ms[fo_target[a]] = PROMOTING;
    send(down[fo_target[a]], Promote, fo_epoch[a], 0)
}

#define CAN_PROMOTED(a) ((rs[a] == STREAMING || rs[a] == DRAINED) && HEAD(down[a], Promote) && \
                         lg[a].wlen < MAXLEN && NFULL(up[a]))
inline do_promoted(a) {
    /* the replica raises its epoch, becomes master, writes EpochStarted, answers */
    recv(down[a], sep, sj);
    become_master(a, sep);
    send(up[a], Promoted, sep, lg[a].wlen);
    rs[a] = PROMOTING;
    sep = 0
}

#define CAN_HANDED(a) (ms[a] == PROMOTING && HEAD(up[a], Promoted))
inline do_handed(a) {
    /* the old master hands over and becomes a replica (of the new master) */
    recv(up[a], si, sj);
    sep = target[a];
    assert(si == fo_epoch[sep]);
    role[sep] = REPLICA; handing[sep] = false; paused[sep] = false; fo_target[sep] = NONE;
    close_conn(a);
    drop_replicas_of(sep);
    sep = 0
}

#define CAN_RESOLVE(a) (handing[a] && fo_target[a] != NONE && \
                        !(target[fo_target[a]] == a && (ms[fo_target[a]] == PROMOTING || rs[fo_target[a]] == PROMOTING)))
inline do_resolve(a) {
    /* the Promote connection is gone: ask the target which epoch it is in */
    if
    :: epoch[fo_target[a]] >= fo_epoch[a] -> role[a] = REPLICA; drop_replicas_of(a)
    :: else -> skip   /* it never promoted: resume as master */
    fi;
    paused[a] = false; handing[a] = false; fo_target[a] = NONE
}

/* -- hard failover and what follows it ------------------------------------------------------ */

#define CAN_FORCE(a) (role[a] == REPLICA && hard < MAXHARD && lg[a].wlen < MAXLEN)
inline do_force(a) {
    /* walctl promote --force: the old master may still be taking writes */
    hard++;
    if :: target[a] != NONE -> close_conn(a) :: else -> skip fi;
    stuck[a] = false;
    sep = epoch[a] + 1;   /* above every epoch of its own history */
    become_master(a, sep);
    sep = 0
}

#define CAN_DEMOTE(a, b) (role[a] == MASTER && role[b] == MASTER && epoch[b] > epoch[a])
inline do_demote(a, b) {
    /* the operator stops the deposed master and restarts it as a replica */
    lg[a].wlen = lg[a].dlen;
    role[a] = REPLICA; paused[a] = false; handing[a] = false; fo_target[a] = NONE;
    if :: target[a] != NONE -> close_conn(a) :: else -> skip fi;
    drop_replicas_of(a)
}

#define UNRECONCILED(id) (aside[id] && !reconciled[id])
#define ANY_UNRECONCILED (UNRECONCILED(1) || UNRECONCILED(2) || UNRECONCILED(3) || UNRECONCILED(4) || \
                          UNRECONCILED(5) || UNRECONCILED(6) || UNRECONCILED(7))
#define CAN_RECONCILE(b) (ANY_UNRECONCILED && role[b] == MASTER && !paused[b] && !handing[b] && \
                          lg[b].wlen == lg[b].dlen)
inline do_reconcile(b) {
    /* a kept tail's messages are delivered again on the master (REC-5: the same
     * GUID already there is the same message); one message per step */
    sk = 1;
    do
    :: !UNRECONCILED(sk) -> sk++
    :: else -> break
    od;
    holds(b, sk, sok);
    if
    :: !sok && lg[b].wlen < MAXLEN ->
        lg[b].rec[lg[b].wlen] = REC(epoch[b], sk);
        lg[b].wlen++;
        lg[b].dlen = lg[b].wlen;
        note_write(b, epoch[b]);
        copy_hist(b);
        reconciled[sk] = true
    :: sok -> reconciled[sk] = true
    :: else -> skip   /* the bounded log is full: stays unreconciled, still kept aside */
    fi
}

/* -- one action per node or ordered pair of nodes -------------------------------------------- */

#if N == 2
#define EACH(X) X(0) X(1)
#define EACH_PAIR(X) X(0, 1) X(1, 0)
#elif N == 3
#define EACH(X) X(0) X(1) X(2)
#define EACH_PAIR(X) X(0, 1) X(0, 2) X(1, 0) X(1, 2) X(2, 0) X(2, 1)
#else
#error "N must be 2 or 3"
#endif

#define STEP(can, act, a) :: d_step { can(a) -> act(a) }
#define STEP2(can, act, a, b) :: d_step { can(a, b) -> act(a, b) }

#define WRITE(a) STEP(CAN_WRITE, do_write, a)
#define SYNC(a) STEP(CAN_SYNC, do_sync, a)
#define CRASH(a) STEP(CAN_CRASH, do_crash, a)
#define BREAK(a) STEP(CAN_BREAK, do_break, a)
#define CONNECT(a, b) STEP2(CAN_CONNECT, do_connect, a, b)
#define DECIDE_(a) STEP(CAN_DECIDE, do_decide, a)
#define ACCEPTED(a) STEP(CAN_ACCEPTED, do_accepted, a)
#define REFUSED(a) STEP(CAN_REFUSED, do_refused, a)
#define SHIP(a) STEP(CAN_SHIP, do_ship, a)
#define APPEND(a) STEP(CAN_APPEND, do_append, a)
#define ACKED(a) STEP(CAN_ACKED, do_acked, a)
#define HANDOVER(a, b) STEP2(CAN_HANDOVER, do_handover, a, b)
#define FENCE(a) STEP(CAN_FENCE, do_fence, a)
#define FENCED(a) STEP(CAN_FENCED, do_fenced, a)
#define DRAIN(a) STEP(CAN_DRAIN, do_drain, a)
#define DRAINED_(a) STEP(CAN_DRAINED, do_drained, a)
#define PROMOTE(a) STEP(CAN_PROMOTE, do_promote, a)
#define PROMOTED_(a) STEP(CAN_PROMOTED, do_promoted, a)
#define HANDED(a) STEP(CAN_HANDED, do_handed, a)
#define RESOLVE(a) STEP(CAN_RESOLVE, do_resolve, a)
#define FORCE(a) STEP(CAN_FORCE, do_force, a)
#define DEMOTE(a, b) STEP2(CAN_DEMOTE, do_demote, a, b)
#define RECONCILE(a) STEP(CAN_RECONCILE, do_reconcile, a)

/* ---------------------------------------------------------------- the system */

/* The invariants are checked in every reachable state: this step is always
 * enabled and changes nothing (its scratch variables are hidden), so in each
 * state the search also takes it (from the first state after initialisation on).
 * Compile pan with -DNOREDUCE so that partial order reduction never skips it. */
proctype monitor() {
end: do
    :: d_step { check() }
    od
}

active proctype cluster() {
    /* initial state: node 0 is master in epoch 1, every log empty */
    d_step {
        si = 0;
        do
        :: si < N ->
            role[si] = REPLICA; epoch[si] = 1; target[si] = NONE; fo_target[si] = NONE;
            rs[si] = CLOSED; ms[si] = CLOSED; si++
        :: else -> break
        od;
        si = 0;
        role[0] = MASTER; slot[0] = 0
    };
    run monitor();
end: do
    EACH(WRITE)
    EACH(SYNC)
    EACH(CRASH)
    EACH(BREAK)
    EACH_PAIR(CONNECT)
    EACH(DECIDE_)
    EACH(ACCEPTED)
    EACH(REFUSED)
    EACH(SHIP)
    EACH(APPEND)
    EACH(ACKED)
    EACH_PAIR(HANDOVER)
    EACH(FENCE)
    EACH(FENCED)
    EACH(DRAIN)
    EACH(DRAINED_)
    EACH(PROMOTE)
    EACH(PROMOTED_)
    EACH(HANDED)
    EACH(RESOLVE)
    EACH(FORCE)
    EACH_PAIR(DEMOTE)
    EACH(RECONCILE)
    od
}
