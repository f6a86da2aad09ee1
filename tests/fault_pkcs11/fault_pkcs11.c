/*
 * fault_pkcs11: a PKCS#11 module that wraps a real one (SoftHSM by default)
 * and injects the faults of a real smart card.  Test support only.
 *
 * Environment:
 *   FAULT_PKCS11_TARGET   real module (default /usr/lib/softhsm/libsofthsm2.so)
 *   FAULT_PKCS11_CONTROL  control file; missing variable or file = no faults
 *
 * The control file ("key = value" lines, '#' comments, unknown keys ignored)
 * is checked on every wrapped call (stat; re-read when it changed or is
 * younger than 1 s, as file timestamps are coarse).  Keys:
 *   present = 0|1          0: no slot has a token, all sessions die
 *   show_token = LABEL     expose only the slot holding token LABEL, as slot 0
 *   show_token = L1,L2,..  several readers: token Li (when present) as slot i-1, the other
 *                          real slots hidden, an empty Li an empty reader ("alice," = two readers); a change that keeps a label at its position
 *                          leaves that card's sessions alone (one reader's card pulled or
 *                          inserted, the others untouched)
 *   generation = ANY       any change = card removed and re-inserted
 *   fail = C_Fn:CKR_X[,C_Fn:0xNN...]   C_Fn returns that error, for every C_Fn
 *                          but C_GetInfo, C_GetFunctionList, C_Finalize,
 *                          C_CloseSession, C_CloseAllSessions, C_WaitForSlotEvent;
 *                          an injected C_Sign/C_SignFinal error ends the real
 *                          operation too (logged "injected", not a signature)
 *   sign_delay_ms = N      C_Sign / C_SignFinal sleep N ms (not for size queries)
 *   crash_in = C_Fn        C_Fn aborts the calling process (SIGABRT), logged "crash in C_Fn"
 *                          first: a module that crashes on a card (any C_Fn that honours fail)
 *   login_delay_ms = N     C_Login sleeps N ms before it logs in (a slow card, a PIN pad
 *                          waiting for its holder); logged "login-delay ms=N" as it starts
 *   find_delay_ms = N      C_FindObjectsInit sleeps N ms first (a slow card read for its
 *                          certificates and keys); logged "find-delay ms=N" as it starts
 *   hide_mechanisms = M,.. the token lacks these mechanisms (hex or decimal CKM_ numbers): left out
 *                          of C_GetMechanismList, CKR_MECHANISM_INVALID from C_GetMechanismInfo and
 *                          C_SignInit (e.g. 0x0d,0x43,0x44,0x45,0x0e: a card without RSA-PSS)
 *   pin_retries = N        emulated user PIN retry counter, kept in <control>.state
 *   token_flags_set = HEX, token_flags_clear = HEX   edit CK_TOKEN_INFO.flags
 *   protected_pin = PIN    PIN "typed on the PIN pad" for C_Login(pPin=NULL)
 *   log = PATH             append one line per call of interest (C_Login lines end in
 *                          token=LABEL: which card the PIN was tried on; an injected
 *                          C_GetTokenInfo failure is logged: which process's look failed)
 *
 * A change of present, show_token (but see above) or generation is a removal/insertion: every
 * open session becomes invalid (CKR_SESSION_HANDLE_INVALID, also from
 * C_CloseSession, which still closes it in the real module) and the real
 * module is logged out, so a re-inserted card needs a new login.
 *
 * Every slot says it holds a removable device (CKF_REMOVABLE_DEVICE), as a card
 * reader's does: its card can be pulled (present = 0), which the real module's
 * slots (SoftHSM's are fixed) could not be.
 *
 * Only C_GetFunctionList is exported (no C_GetInterface: callers fall back to
 * the v2.40 function list).
 */
#define _DEFAULT_SOURCE
#define _POSIX_C_SOURCE 200809L

#include "pkcs11_min.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))
#define DEFAULT_TARGET "/usr/lib/softhsm/libsofthsm2.so"
#define MAX_FAILS 32
#define MAX_READERS 8
#define SHOW_LEN 256
#define PATH_LEN 4096

struct fail { char fn[40]; CK_RV rv; };

struct cfg {
    int present;
    char show[SHOW_LEN];    /* "" = slots pass through; else reader labels, comma-separated */
    char generation[64];
    struct fail fails[MAX_FAILS];
    int nfails;
    char crash_in[40];
    unsigned long sign_delay_ms;
    unsigned long login_delay_ms;
    unsigned long find_delay_ms;
    CK_MECHANISM_TYPE hidden[MAX_FAILS];
    int nhidden;
    long pin_retries;       /* -1 = off */
    CK_FLAGS flags_set, flags_clear;
    char log[PATH_LEN];
    unsigned long epoch;    /* filled in by snap() */
};

struct sess { CK_SESSION_HANDLE h; CK_SLOT_ID slot; int dead; };

static CK_FUNCTION_LIST *real;
static CK_FUNCTION_LIST wrapped;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_RV load_rv = CKR_GENERAL_ERROR;

/* everything below is guarded by mu */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char ctl_path[PATH_LEN], state_path[PATH_LEN + 8];
static struct cfg cur;
static char protected_pin[256];
static size_t protected_pin_len;
static int have_protected_pin;
static int loaded, file_seen;
static struct stat last_st;
static unsigned long epoch, event_epoch, epoch_events, seen_events;
static int finalizing;
static struct sess *sessions;
static size_t nsess, capsess;
static int show_cached;
static char show_cache_label[SHOW_LEN];
static unsigned long show_cache_epoch;
static CK_SLOT_ID show_cache_slots[MAX_READERS];
static int show_cache_found[MAX_READERS];

/* ------------------------------------------------------------------ utils */

static void wipe(void *p, size_t n)
{
    volatile unsigned char *v = p;
    while (n--) *v++ = 0;
}

static void sleep_ms(unsigned long ms)
{
    struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

static char *trim(char *s)
{
    char *e;
    while (*s == ' ' || *s == '\t') s++;
    e = s + strlen(s);
    while (e > s && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r')) *--e = 0;
    return s;
}

static void copy_str(char *dst, size_t n, const char *src)
{
    size_t l = strlen(src);
    if (l >= n) l = n - 1;
    memcpy(dst, src, l);
    dst[l] = 0;
}

static const struct { const char *name; CK_RV rv; } rv_names[] = {
    { "CKR_OK", CKR_OK }, { "CKR_CANCEL", CKR_CANCEL },
    { "CKR_HOST_MEMORY", CKR_HOST_MEMORY }, { "CKR_SLOT_ID_INVALID", CKR_SLOT_ID_INVALID },
    { "CKR_GENERAL_ERROR", CKR_GENERAL_ERROR }, { "CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED },
    { "CKR_ARGUMENTS_BAD", CKR_ARGUMENTS_BAD }, { "CKR_DATA_LEN_RANGE", CKR_DATA_LEN_RANGE },
    { "CKR_DEVICE_ERROR", CKR_DEVICE_ERROR }, { "CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY },
    { "CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED }, { "CKR_FUNCTION_CANCELED", CKR_FUNCTION_CANCELED },
    { "CKR_FUNCTION_NOT_SUPPORTED", CKR_FUNCTION_NOT_SUPPORTED },
    { "CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID }, { "CKR_MECHANISM_INVALID", CKR_MECHANISM_INVALID },
    { "CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID },
    { "CKR_OPERATION_ACTIVE", CKR_OPERATION_ACTIVE },
    { "CKR_OPERATION_NOT_INITIALIZED", CKR_OPERATION_NOT_INITIALIZED },
    { "CKR_PIN_INCORRECT", CKR_PIN_INCORRECT }, { "CKR_PIN_EXPIRED", CKR_PIN_EXPIRED },
    { "CKR_PIN_LOCKED", CKR_PIN_LOCKED }, { "CKR_SESSION_CLOSED", CKR_SESSION_CLOSED },
    { "CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID },
    { "CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT },
    { "CKR_TOKEN_NOT_RECOGNIZED", CKR_TOKEN_NOT_RECOGNIZED },
    { "CKR_USER_ALREADY_LOGGED_IN", CKR_USER_ALREADY_LOGGED_IN },
    { "CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN },
    { "CKR_BUFFER_TOO_SMALL", CKR_BUFFER_TOO_SMALL },
    { "CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED },
    { "CKR_FUNCTION_REJECTED", CKR_FUNCTION_REJECTED },
};

/* "CKR_NAME" or a number ("0x32"); returns 0 if not understood */
static int parse_rv(const char *s, CK_RV *out)
{
    size_t i;
    char *end;
    for (i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++)
        if (strcmp(s, rv_names[i].name) == 0) { *out = rv_names[i].rv; return 1; }
    if (*s < '0' || *s > '9') return 0;
    *out = strtoul(s, &end, 0);
    return *end == 0;
}

/* ------------------------------------------------------------------- log */

static unsigned long long monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ULL + (unsigned long long)ts.tv_nsec;
}

static void vlog_to(const char *path, const char *fmt, va_list ap)
{
    char line[512];
    int n, fd;
    if (!path[0]) return;
    n = vsnprintf(line, sizeof line - 32, fmt, ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof line - 32) n = (int)(sizeof line - 33);
    n += snprintf(line + n, 32, " pid=%ld\n", (long)getpid());
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) < 0) {}   /* one write per line: atomic with O_APPEND */
    close(fd);
}

static void log_to(const char *path, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog_to(path, fmt, ap);
    va_end(ap);
}

static void log_call(const char *fmt, ...)
{
    char path[PATH_LEN];
    va_list ap;
    pthread_mutex_lock(&mu);
    memcpy(path, cur.log, sizeof path);
    pthread_mutex_unlock(&mu);
    va_start(ap, fmt);
    vlog_to(path, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------- control reload */

static void parse_hidden(struct cfg *c, char *v)
{
    char *save = NULL, *item;
    c->nhidden = 0;
    for (item = strtok_r(v, ",", &save); item && c->nhidden < MAX_FAILS; item = strtok_r(NULL, ",", &save))
        c->hidden[c->nhidden++] = strtoul(trim(item), NULL, 0);
}

static int is_hidden(const struct cfg *c, CK_MECHANISM_TYPE m)
{
    int i;
    for (i = 0; i < c->nhidden; i++)
        if (c->hidden[i] == m) return 1;
    return 0;
}

static void parse_fails(struct cfg *c, char *v)
{
    char *save = NULL, *tok;
    for (tok = strtok_r(v, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(tok, ':');
        CK_RV rv;
        if (!colon || c->nfails >= MAX_FAILS) continue;
        *colon = 0;
        if (!parse_rv(trim(colon + 1), &rv)) {
            fprintf(stderr, "fault_pkcs11: unknown return value '%s'\n", trim(colon + 1));
            continue;
        }
        copy_str(c->fails[c->nfails].fn, sizeof c->fails[0].fn, trim(tok));
        c->fails[c->nfails++].rv = rv;
    }
}

/* kill every live session (card removed); caller holds mu */
static void kill_sessions_locked(void)
{
    size_t i, j;
    for (i = 0; i < nsess; i++) {
        int first_of_slot = 1;
        if (sessions[i].dead) continue;
        for (j = 0; j < i; j++)
            if (sessions[j].slot == sessions[i].slot && sessions[j].dead == 2) first_of_slot = 0;
        sessions[i].dead = 2;   /* 2 = killed just now */
        if (first_of_slot && real) real->C_Logout(sessions[i].h);  /* login state dies with the card */
    }
    for (i = 0; i < nsess; i++)
        if (sessions[i].dead) sessions[i].dead = 1;
}

/* kill the live sessions of one real slot (its card pulled); caller holds mu */
static void kill_slot_sessions_locked(CK_SLOT_ID slot)
{
    size_t i;
    int first = 1;
    for (i = 0; i < nsess; i++) {
        if (sessions[i].dead || sessions[i].slot != slot) continue;
        if (first && real) real->C_Logout(sessions[i].h);
        first = 0;
        sessions[i].dead = 1;
    }
}

/* the n-th comma-separated label of show (trimmed) into out; 0 if there is none */
static int reader_label(const char *show, int index, char *out, size_t size)
{
    const char *p = show, *end;
    int i;
    for (i = 0; i < index; i++) {
        p = strchr(p, ',');
        if (!p) return 0;
        p++;
    }
    end = strchr(p, ',');
    if (!end) end = p + strlen(p);
    while (p < end && (*p == ' ' || *p == '\t')) p++;
    while (end > p && (end[-1] == ' ' || end[-1] == '\t')) end--;
    if ((size_t)(end - p) >= size) return 0;
    memcpy(out, p, (size_t)(end - p));
    out[end - p] = 0;
    return 1;
}

static int is_reader_list(const char *show)
{
    return strchr(show, ',') != NULL;
}

static int label_is(const CK_UTF8CHAR label[32], const char *want);

/* A change between reader lists (old or new with a comma): the cards of readers whose label
 * changed are pulled, the others stay. Returns 0 when this is no reader-list change. Caller holds mu. */
static int readers_changed_locked(const struct cfg *n)
{
    CK_SLOT_ID list[64];
    CK_ULONG count = 64, s;
    int i;
    if (!cur.show[0] || !n->show[0] || (!is_reader_list(cur.show) && !is_reader_list(n->show))) return 0;
    if (!real || real->C_GetSlotList(CK_TRUE, list, &count) != CKR_OK) return 0;
    for (s = 0; s < count; s++) {
        CK_TOKEN_INFO ti;
        char old_label[64], new_label[64];
        int old_index = -1, new_index = -1;
        if (real->C_GetTokenInfo(list[s], &ti) != CKR_OK) continue;
        for (i = 0; i < MAX_READERS && reader_label(cur.show, i, old_label, sizeof old_label); i++)
            if (old_index < 0 && label_is(ti.label, old_label)) old_index = i;
        for (i = 0; i < MAX_READERS && reader_label(n->show, i, new_label, sizeof new_label); i++)
            if (new_index < 0 && label_is(ti.label, new_label)) new_index = i;
        if (old_index >= 0 && old_index != new_index) kill_slot_sessions_locked(list[s]);
    }
    return 1;
}

static void parse_line(struct cfg *n, char *line)
{
    char *k = trim(line), *eq, *v;
    if (*k == '#' || !(eq = strchr(k, '='))) return;
    *eq = 0;
    k = trim(k);
    v = trim(eq + 1);
    if (strcmp(k, "present") == 0) n->present = atoi(v) != 0;
    else if (strcmp(k, "show_token") == 0) copy_str(n->show, sizeof n->show, v);
    else if (strcmp(k, "generation") == 0) copy_str(n->generation, sizeof n->generation, v);
    else if (strcmp(k, "fail") == 0) parse_fails(n, v);
    else if (strcmp(k, "crash_in") == 0) copy_str(n->crash_in, sizeof n->crash_in, v);
    else if (strcmp(k, "sign_delay_ms") == 0) n->sign_delay_ms = strtoul(v, NULL, 10);
    else if (strcmp(k, "login_delay_ms") == 0) n->login_delay_ms = strtoul(v, NULL, 10);
    else if (strcmp(k, "find_delay_ms") == 0) n->find_delay_ms = strtoul(v, NULL, 10);
    else if (strcmp(k, "hide_mechanisms") == 0) parse_hidden(n, v);
    else if (strcmp(k, "pin_retries") == 0) n->pin_retries = *v ? strtol(v, NULL, 10) : -1;
    else if (strcmp(k, "token_flags_set") == 0) n->flags_set = strtoul(v, NULL, 16);
    else if (strcmp(k, "token_flags_clear") == 0) n->flags_clear = strtoul(v, NULL, 16);
    else if (strcmp(k, "log") == 0) copy_str(n->log, sizeof n->log, v);
    else if (strcmp(k, "protected_pin") == 0) {
        copy_str(protected_pin, sizeof protected_pin, v);
        protected_pin_len = strlen(protected_pin);
        have_protected_pin = 1;
    }
}

static void reload_locked(void)
{
    static char buf[16384];
    struct stat st;
    struct timespec now;
    struct cfg n;
    char *line, *save = NULL;
    ssize_t len = 0;
    long age_ms;
    int exists, fd;

    if (!ctl_path[0]) return;
    exists = stat(ctl_path, &st) == 0;
    clock_gettime(CLOCK_REALTIME, &now);
    age_ms = !exists ? 0 : (long)(now.tv_sec - st.st_mtim.tv_sec) * 1000
                               + (now.tv_nsec - st.st_mtim.tv_nsec) / 1000000;
    if (loaded && exists == file_seen
        && (!exists
            || (st.st_ino == last_st.st_ino && st.st_size == last_st.st_size
                && st.st_mtim.tv_sec == last_st.st_mtim.tv_sec
                && st.st_mtim.tv_nsec == last_st.st_mtim.tv_nsec
                && st.st_ctim.tv_sec == last_st.st_ctim.tv_sec
                && st.st_ctim.tv_nsec == last_st.st_ctim.tv_nsec
                /* file timestamps are coarse: trust them only for older files */
                && age_ms > 1000)))
        return;
    if (exists) last_st = st;
    file_seen = exists;

    memset(&n, 0, sizeof n);
    n.present = 1;
    n.pin_retries = -1;
    wipe(protected_pin, sizeof protected_pin);
    have_protected_pin = 0;
    protected_pin_len = 0;

    if (exists && (fd = open(ctl_path, O_RDONLY | O_CLOEXEC)) >= 0) {
        ssize_t r;
        while (len < (ssize_t)sizeof buf - 1 && (r = read(fd, buf + len, sizeof buf - 1 - (size_t)len)) > 0)
            len += r;
        close(fd);
    }
    buf[len] = 0;
    for (line = strtok_r(buf, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
        parse_line(&n, line);
    wipe(buf, (size_t)len);   /* it may hold protected_pin */
    if (n.pin_retries < -1) n.pin_retries = -1;

    if (loaded && (n.present != cur.present || strcmp(n.generation, cur.generation) != 0
                   || (strcmp(n.show, cur.show) != 0 && !readers_changed_locked(&n)))) {
        epoch++;
        show_cached = 0;
        kill_sessions_locked();
        log_to(n.log, "EVENT epoch=%lu present=%d show_token=%s", epoch, n.present, n.show);
    } else if (loaded && strcmp(n.show, cur.show) != 0) {
        epoch_events++;
        show_cached = 0;
        log_to(n.log, "EVENT readers present=%d show_token=%s", n.present, n.show);
    }
    cur = n;
    loaded = 1;
}

/* reload and copy the configuration */
static void snap(struct cfg *c)
{
    pthread_mutex_lock(&mu);
    reload_locked();
    *c = cur;
    c->epoch = epoch;
    pthread_mutex_unlock(&mu);
}

static CK_RV injected(const struct cfg *c, const char *fn)
{
    int i;
    if (c->crash_in[0] && strcmp(c->crash_in, fn) == 0) {
        log_to(c->log, "crash in %s", fn);  /* not log_call: callers may hold mu */
        abort();
    }
    for (i = 0; i < c->nfails; i++)
        if (strcmp(c->fails[i].fn, fn) == 0) return c->fails[i].rv;
    return CKR_OK;
}

/* --------------------------------------------------------------- sessions */

static struct sess *find_locked(CK_SESSION_HANDLE h)
{
    size_t i;
    for (i = 0; i < nsess; i++)
        if (sessions[i].h == h) return &sessions[i];
    return NULL;
}

static void add_session(CK_SESSION_HANDLE h, CK_SLOT_ID slot, unsigned long seen_epoch)
{
    pthread_mutex_lock(&mu);
    if (nsess == capsess) {
        size_t cap = capsess ? capsess * 2 : 16;
        struct sess *p = realloc(sessions, cap * sizeof *p);
        if (!p) { pthread_mutex_unlock(&mu); return; }
        sessions = p;
        capsess = cap;
    }
    sessions[nsess].h = h;
    sessions[nsess].slot = slot;
    sessions[nsess].dead = seen_epoch != epoch;  /* card changed while opening */
    nsess++;
    pthread_mutex_unlock(&mu);
}

static void drop_sessions_locked(int all, CK_SLOT_ID slot, CK_SESSION_HANDLE h)
{
    size_t i = 0;
    while (i < nsess) {
        if (all ? sessions[i].slot == slot : sessions[i].h == h) sessions[i] = sessions[--nsess];
        else i++;
    }
}

/* reload, then check that the session belongs to the current card */
static CK_RV check_session(CK_SESSION_HANDLE h, struct cfg *c, CK_SLOT_ID *slot)
{
    struct sess *s;
    CK_RV rv = CKR_OK;
    pthread_mutex_lock(&mu);
    reload_locked();
    s = find_locked(h);
    if ((s && s->dead) || !cur.present) rv = CKR_SESSION_HANDLE_INVALID;
    if (slot) *slot = s ? s->slot : (CK_SLOT_ID)-1;
    if (c) { *c = cur; c->epoch = epoch; }
    pthread_mutex_unlock(&mu);
    return rv;
}

/* for generated forwarders: session check plus injected failure */
static CK_RV pre_generic(const char *fn, CK_SESSION_HANDLE h, int log_errors)
{
    CK_RV rv, inj = CKR_OK;
    pthread_mutex_lock(&mu);
    reload_locked();
    {
        struct sess *s = find_locked(h);
        rv = ((s && s->dead) || !cur.present) ? CKR_SESSION_HANDLE_INVALID : CKR_OK;
    }
    if (rv == CKR_OK) rv = inj = injected(&cur, fn);
    pthread_mutex_unlock(&mu);
    if (inj != CKR_OK) log_call("%s rv=0x%lx injected", fn, inj);
    else if (rv != CKR_OK && log_errors) log_call("%s rv=0x%lx", fn, rv);
    return rv;
}

/* ------------------------------------------------------------------ slots */

static int label_is(const CK_UTF8CHAR label[32], const char *want)
{
    size_t n = 32, w = strlen(want);
    while (n > 0 && (label[n - 1] == ' ' || label[n - 1] == 0)) n--;
    return n == w && memcmp(label, want, n) == 0;
}

/* the real slots of the readers of c->show (found[i] = 0: reader i is empty); returns the count */
static int resolve_readers(const struct cfg *c, CK_SLOT_ID slots[MAX_READERS], int found[MAX_READERS])
{
    CK_SLOT_ID list[64];
    CK_ULONG n = 64, s;
    char label[64];
    int i, readers = 0;

    pthread_mutex_lock(&mu);
    if (show_cached && show_cache_epoch == c->epoch && strcmp(show_cache_label, c->show) == 0) {
        memcpy(slots, show_cache_slots, sizeof show_cache_slots);
        memcpy(found, show_cache_found, sizeof show_cache_found);
        for (readers = 0; readers < MAX_READERS && reader_label(c->show, readers, label, sizeof label); readers++) {}
        pthread_mutex_unlock(&mu);
        return readers;
    }
    pthread_mutex_unlock(&mu);

    for (i = 0; i < MAX_READERS; i++) found[i] = 0;
    for (readers = 0; readers < MAX_READERS && reader_label(c->show, readers, label, sizeof label); readers++) {}
    if (real->C_GetSlotList(CK_TRUE, list, &n) != CKR_OK) return readers;
    for (s = 0; s < n; s++) {
        CK_TOKEN_INFO ti;
        if (real->C_GetTokenInfo(list[s], &ti) != CKR_OK) continue;
        for (i = 0; i < readers; i++)
            if (!found[i] && reader_label(c->show, i, label, sizeof label) && label[0] && label_is(ti.label, label)) {
                slots[i] = list[s];
                found[i] = 1;
            }
    }
    pthread_mutex_lock(&mu);
    show_cached = 1;
    memcpy(show_cache_slots, slots, sizeof show_cache_slots);
    memcpy(show_cache_found, found, sizeof show_cache_found);
    show_cache_epoch = c->epoch;
    copy_str(show_cache_label, sizeof show_cache_label, c->show);
    pthread_mutex_unlock(&mu);
    return readers;
}

/* real slot of reader ``index`` of c->show; 0 if that reader is empty */
static int resolve_reader(const struct cfg *c, CK_SLOT_ID index, CK_SLOT_ID *out)
{
    CK_SLOT_ID slots[MAX_READERS];
    int found[MAX_READERS];
    int readers = resolve_readers(c, slots, found);
    if (index >= (CK_SLOT_ID)readers || !found[index]) return 0;
    *out = slots[index];
    return 1;
}

/* caller's slot id of a real slot: its reader index with show_token, else itself */
static CK_SLOT_ID reader_of(const struct cfg *c, CK_SLOT_ID real_slot)
{
    CK_SLOT_ID slots[MAX_READERS];
    int found[MAX_READERS];
    int i, readers;
    if (!c->show[0]) return real_slot;
    readers = resolve_readers(c, slots, found);
    for (i = 0; i < readers; i++)
        if (found[i] && slots[i] == real_slot) return (CK_SLOT_ID)i;
    return 0;
}

/* caller's slot id -> real slot id.  *have = 0: the visible slot is empty. */
static CK_RV map_slot(const struct cfg *c, CK_SLOT_ID id, int need_token, CK_SLOT_ID *out, int *have)
{
    *have = 1;
    *out = id;
    if (c->show[0]) {
        char label[64];
        if (id >= MAX_READERS || !reader_label(c->show, (int)id, label, sizeof label)) return CKR_SLOT_ID_INVALID;
        *have = resolve_reader(c, id, out);
    }
    if (!c->present) *have = 0;
    return (need_token && !*have) ? CKR_TOKEN_NOT_PRESENT : CKR_OK;
}

static CK_RV w_C_GetSlotList P_C_GetSlotList
{
    struct cfg c;
    CK_SLOT_ID slots[MAX_READERS], ids[MAX_READERS];
    int found[MAX_READERS];
    CK_ULONG have = 0, i;
    int readers = 0;
    CK_RV rv;
    snap(&c);
    if ((rv = injected(&c, "C_GetSlotList")) != CKR_OK) return rv;
    if (!c.show[0] && (c.present || !tokenPresent)) return real->C_GetSlotList A_C_GetSlotList;
    if (!pulCount) return CKR_ARGUMENTS_BAD;
    if (c.show[0]) readers = resolve_readers(&c, slots, found);
    for (i = 0; i < (CK_ULONG)readers; i++)
        if (!tokenPresent || (c.present && found[i])) ids[have++] = i;
    if (pSlotList && *pulCount < have) rv = CKR_BUFFER_TOO_SMALL;
    else if (pSlotList) for (i = 0; i < have; i++) pSlotList[i] = ids[i];
    *pulCount = have;
    return rv;
}

static CK_RV w_C_GetSlotInfo P_C_GetSlotInfo
{
    struct cfg c;
    CK_SLOT_ID r;
    int have;
    CK_RV rv;
    snap(&c);
    if ((rv = injected(&c, "C_GetSlotInfo")) != CKR_OK) return rv;
    if ((rv = map_slot(&c, slotID, 0, &r, &have)) != CKR_OK) return rv;
    if (!pInfo) return CKR_ARGUMENTS_BAD;
    if (c.show[0] && (!c.present || !resolve_reader(&c, slotID, &r))) {
        memset(pInfo, 0, sizeof *pInfo);
        memset(pInfo->slotDescription, ' ', sizeof pInfo->slotDescription);
        memset(pInfo->manufacturerID, ' ', sizeof pInfo->manufacturerID);
        memcpy(pInfo->slotDescription, "fault_pkcs11 reader", 19);
        memcpy(pInfo->manufacturerID, "fault_pkcs11", 12);
        pInfo->flags = CKF_REMOVABLE_DEVICE | CKF_HW_SLOT;
        return CKR_OK;
    }
    rv = real->C_GetSlotInfo(r, pInfo);
    if (rv == CKR_OK) {
        if (!have) pInfo->flags &= ~CKF_TOKEN_PRESENT;
        pInfo->flags |= CKF_REMOVABLE_DEVICE; /* a reader: present = 0 pulls its card */
    }
    return rv;
}

/* emulated retry counter, stored as "remaining = N" in <control>.state */
static long read_remaining(int fd, long max)
{
    char buf[64];
    ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
    char *p;
    long v;
    if (n <= 0) return max;
    buf[n] = 0;
    p = strchr(buf, '=');
    v = strtol(p ? p + 1 : buf, NULL, 10);
    return v < 0 ? 0 : v > max ? max : v;
}

static void write_remaining(int fd, long v)
{
    char buf[64];
    int n = snprintf(buf, sizeof buf, "remaining = %ld\n", v);
    if (ftruncate(fd, 0) != 0 || pwrite(fd, buf, (size_t)n, 0) != n)
        fprintf(stderr, "fault_pkcs11: cannot write %s\n", state_path);
}

static long pin_remaining(long max)
{
    long v = max;
    int fd = open(state_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return max;
    if (flock(fd, LOCK_SH) == 0) v = read_remaining(fd, max);
    close(fd);
    return v;
}

static CK_FLAGS adjust_flags(const struct cfg *c, CK_FLAGS f)
{
    if (c->pin_retries >= 0) {
        long left = pin_remaining(c->pin_retries);
        f &= ~(CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED);
        if (left < c->pin_retries) f |= CKF_USER_PIN_COUNT_LOW;
        if (left == 1) f |= CKF_USER_PIN_FINAL_TRY;
        if (left == 0) f |= CKF_USER_PIN_LOCKED;
    }
    return (f & ~c->flags_clear) | c->flags_set;
}

static CK_RV w_C_GetTokenInfo P_C_GetTokenInfo
{
    struct cfg c;
    CK_SLOT_ID r;
    int have;
    CK_RV rv;
    snap(&c);
    if ((rv = injected(&c, "C_GetTokenInfo")) != CKR_OK) {
        log_call("C_GetTokenInfo rv=0x%lx injected", rv);
        return rv;
    }
    if ((rv = map_slot(&c, slotID, 1, &r, &have)) != CKR_OK) return rv;
    rv = real->C_GetTokenInfo(r, pInfo);
    if (rv == CKR_OK) pInfo->flags = adjust_flags(&c, pInfo->flags);
    return rv;
}

/* slot functions that need a token and otherwise just forward */
#define FWD_SLOT(fn)                                                    \
    static CK_RV w_##fn P_##fn                                          \
    {                                                                   \
        struct cfg c;                                                   \
        int have;                                                       \
        CK_RV rv;                                                       \
        snap(&c);                                                       \
        if ((rv = injected(&c, #fn)) != CKR_OK) return rv;              \
        if ((rv = map_slot(&c, slotID, 1, &slotID, &have)) != CKR_OK)   \
            return rv;                                                  \
        return real->fn A_##fn;                                         \
    }
FWD_SLOT(C_InitToken)

static CK_RV w_C_GetMechanismList P_C_GetMechanismList
{
    struct cfg c;
    int have;
    CK_RV rv;
    CK_ULONG count = 0, i, kept = 0;
    CK_MECHANISM_TYPE *all;
    snap(&c);
    if ((rv = injected(&c, "C_GetMechanismList")) != CKR_OK) return rv;
    if ((rv = map_slot(&c, slotID, 1, &slotID, &have)) != CKR_OK) return rv;
    if (!c.nhidden) return real->C_GetMechanismList(slotID, pMechanismList, pulCount);
    if ((rv = real->C_GetMechanismList(slotID, NULL, &count)) != CKR_OK) return rv;
    all = calloc(count ? count : 1, sizeof *all);
    if (!all) return CKR_HOST_MEMORY;
    if ((rv = real->C_GetMechanismList(slotID, all, &count)) == CKR_OK) {
        for (i = 0; i < count; i++)
            if (!is_hidden(&c, all[i])) {
                if (pMechanismList && kept < *pulCount) pMechanismList[kept] = all[i];
                kept++;
            }
        if (pMechanismList && kept > *pulCount) rv = CKR_BUFFER_TOO_SMALL;
        *pulCount = kept;
    }
    free(all);
    return rv;
}

static CK_RV w_C_GetMechanismInfo P_C_GetMechanismInfo
{
    struct cfg c;
    int have;
    CK_RV rv;
    snap(&c);
    if ((rv = injected(&c, "C_GetMechanismInfo")) != CKR_OK) return rv;
    if ((rv = map_slot(&c, slotID, 1, &slotID, &have)) != CKR_OK) return rv;
    if (is_hidden(&c, type)) return CKR_MECHANISM_INVALID;
    return real->C_GetMechanismInfo(slotID, type, pInfo);
}

static CK_RV w_C_OpenSession P_C_OpenSession
{
    struct cfg c;
    CK_SLOT_ID r;
    int have;
    CK_RV rv = CKR_OK;
    snap(&c);
    if ((rv = injected(&c, "C_OpenSession")) != CKR_OK) {
        log_call("C_OpenSession rv=0x%lx injected", rv);
        return rv;
    }
    if ((rv = map_slot(&c, slotID, 1, &r, &have)) == CKR_OK)
        rv = real->C_OpenSession(r, flags, pApplication, Notify, phSession);
    if (rv == CKR_OK) add_session(*phSession, r, c.epoch);
    log_call("C_OpenSession rv=0x%lx", rv);
    return rv;
}

static CK_RV w_C_CloseSession P_C_CloseSession
{
    struct sess *s;
    int dead;
    CK_RV rv;
    pthread_mutex_lock(&mu);
    reload_locked();
    s = find_locked(hSession);
    dead = (s && s->dead) || !cur.present;
    drop_sessions_locked(0, 0, hSession);
    pthread_mutex_unlock(&mu);
    rv = real->C_CloseSession(hSession);
    return dead ? CKR_SESSION_HANDLE_INVALID : rv;
}

static CK_RV w_C_CloseAllSessions P_C_CloseAllSessions
{
    struct cfg c;
    CK_SLOT_ID r;
    int have;
    CK_RV rv;
    snap(&c);
    if ((rv = map_slot(&c, slotID, 0, &r, &have)) != CKR_OK) return rv;
    if (c.show[0] && !resolve_reader(&c, slotID, &r)) return CKR_OK;
    rv = real->C_CloseAllSessions(r);
    pthread_mutex_lock(&mu);
    drop_sessions_locked(1, r, 0);
    pthread_mutex_unlock(&mu);
    return rv;
}

static CK_RV w_C_GetSessionInfo P_C_GetSessionInfo
{
    struct cfg c;
    CK_RV rv = check_session(hSession, &c, NULL);
    if (rv == CKR_OK) rv = injected(&c, "C_GetSessionInfo");
    if (rv != CKR_OK) return rv;
    rv = real->C_GetSessionInfo(hSession, pInfo);
    if (rv == CKR_OK && c.show[0]) pInfo->slotID = reader_of(&c, pInfo->slotID);
    return rv;
}

/* ------------------------------------------------------------------ login */

static int protected_path(const struct cfg *c, CK_SLOT_ID slot)
{
    CK_TOKEN_INFO ti;
    if (c->flags_set & CKF_PROTECTED_AUTHENTICATION_PATH) return 1;
    if (c->flags_clear & CKF_PROTECTED_AUTHENTICATION_PATH) return 0;
    return real->C_GetTokenInfo(slot, &ti) == CKR_OK && (ti.flags & CKF_PROTECTED_AUTHENTICATION_PATH);
}

/* the real login, with the PIN pad emulation */
static CK_RV do_login(const struct cfg *c, CK_SLOT_ID slot, CK_SESSION_HANDLE h,
                      CK_USER_TYPE ut, CK_UTF8CHAR *pin, CK_ULONG len, int *pad)
{
    char buf[sizeof protected_pin];
    size_t n = 0;
    int have = 0;
    CK_RV rv;
    *pad = 0;
    if (pin != NULL || !protected_path(c, slot)) return real->C_Login(h, ut, pin, len);
    *pad = 1;
    pthread_mutex_lock(&mu);
    if (have_protected_pin) {
        memcpy(buf, protected_pin, sizeof buf);
        n = protected_pin_len;
        have = 1;
    }
    pthread_mutex_unlock(&mu);
    if (!have) return CKR_PIN_INCORRECT;   /* the user typed something wrong on the pad */
    rv = real->C_Login(h, ut, (CK_UTF8CHAR *)buf, (CK_ULONG)n);
    wipe(buf, sizeof buf);
    return rv;
}

/* the label of the token in a real slot, without padding ("?" if unknown), for the log */
static void token_label(CK_SLOT_ID slot, char *out, size_t size)
{
    CK_TOKEN_INFO ti;
    size_t n = 32;
    copy_str(out, size, "?");
    if (real->C_GetTokenInfo(slot, &ti) != CKR_OK) return;
    while (n > 0 && (ti.label[n - 1] == ' ' || ti.label[n - 1] == 0)) n--;
    if (n >= size) n = size - 1;
    memcpy(out, ti.label, n);
    out[n] = 0;
}

static CK_RV w_C_Login P_C_Login
{
    char label[40];
    struct cfg c;
    CK_SLOT_ID slot;
    long left = -1;
    int pad = 0, fd;
    CK_RV rv = check_session(hSession, &c, &slot);

    if (rv == CKR_OK && (rv = injected(&c, "C_Login")) != CKR_OK) {
        log_call("C_Login rv=0x%lx user=%lu injected", rv, userType);
        return rv;
    }
    if (rv != CKR_OK) {
        log_call("C_Login rv=0x%lx user=%lu", rv, userType);
        return rv;
    }
    if (c.login_delay_ms) {
        log_call("login-delay ms=%lu", c.login_delay_ms);
        sleep_ms(c.login_delay_ms);
    }
    if (c.pin_retries < 0 || (userType != CKU_USER && userType != CKU_CONTEXT_SPECIFIC)) {
        rv = do_login(&c, slot, hSession, userType, pPin, ulPinLen, &pad);
    } else if ((fd = open(state_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600)) < 0) {
        fprintf(stderr, "fault_pkcs11: cannot open %s\n", state_path);
        rv = CKR_DEVICE_ERROR;
    } else {
        /* the lock serialises logins of all processes, like one card would */
        if (flock(fd, LOCK_EX) != 0) { close(fd); return CKR_DEVICE_ERROR; }
        left = read_remaining(fd, c.pin_retries);
        if (left <= 0) {
            rv = CKR_PIN_LOCKED;
        } else {
            rv = do_login(&c, slot, hSession, userType, pPin, ulPinLen, &pad);
            if (rv == CKR_PIN_INCORRECT) left--;
            else if (rv == CKR_OK) left = c.pin_retries;
            write_remaining(fd, left);
        }
        close(fd);
    }
    token_label(slot, label, sizeof label);
    if (left >= 0)
        log_call("C_Login rv=0x%lx user=%lu%s remaining=%ld token=%s", rv, userType, pad ? " pinpad" : "", left, label);
    else
        log_call("C_Login rv=0x%lx user=%lu%s token=%s", rv, userType, pad ? " pinpad" : "", label);
    return rv;
}

/* ------------------------------------------------------------------- sign */

/* an injected error ends the real operation too, as a real error would */
static void end_sign_op(CK_SESSION_HANDLE h, CK_BYTE *data, CK_ULONG len, int final)
{
    CK_ULONG n = 0;
    CK_BYTE *buf;
    if ((final ? real->C_SignFinal(h, NULL, &n) : real->C_Sign(h, data, len, NULL, &n)) != CKR_OK) return;
    if (!(buf = malloc(n ? n : 1))) return;
    if (final) real->C_SignFinal(h, buf, &n);
    else real->C_Sign(h, data, len, buf, &n);
    free(buf);
}

static CK_RV sign_common(const char *fn, int final, CK_SESSION_HANDLE h, CK_BYTE *data,
                         CK_ULONG len, CK_BYTE *sig, CK_ULONG *siglen)
{
    struct cfg c;
    unsigned long long begin_ns;
    CK_RV rv = check_session(h, &c, NULL), inj;
    if (rv != CKR_OK) {
        log_call("%s rv=0x%lx", fn, rv);
        return rv;
    }
    inj = injected(&c, fn);
    begin_ns = monotonic_ns();
    if (sig && c.sign_delay_ms) sleep_ms(c.sign_delay_ms);
    if (inj != CKR_OK) {
        end_sign_op(h, data, len, final);
        log_call("%s rv=0x%lx injected", fn, inj);
        return inj;
    }
    rv = final ? real->C_SignFinal(h, sig, siglen) : real->C_Sign(h, data, len, sig, siglen);
    /* begin/end on CLOCK_MONOTONIC: lets a test prove that signatures of one token never overlap */
    log_call("%s rv=0x%lx%s begin_ns=%llu end_ns=%llu", fn, rv, sig ? "" : " size_query", begin_ns,
             monotonic_ns());
    return rv;
}

static CK_RV w_C_Sign P_C_Sign
{
    return sign_common("C_Sign", 0, hSession, pData, ulDataLen, pSignature, pulSignatureLen);
}

static CK_RV w_C_SignFinal P_C_SignFinal
{
    return sign_common("C_SignFinal", 1, hSession, NULL, 0, pSignature, pulSignatureLen);
}

/* ------------------------------------------------------- the rest: forward */

#define FWD_(fn, log_errors, log_all)                                  \
    static CK_RV w_##fn P_##fn                                         \
    {                                                                  \
        CK_RV rv_ = pre_generic(#fn, hSession, log_errors);            \
        if (rv_ != CKR_OK) return rv_;                                 \
        rv_ = real->fn A_##fn;                                         \
        if (log_all) log_call("%s rv=0x%lx", #fn, rv_);                \
        return rv_;                                                    \
    }
#define FWD(fn) FWD_(fn, 0, 0)
#define FWD_LOG(fn) FWD_(fn, 1, 1)

FWD(C_InitPIN) FWD(C_SetPIN) FWD(C_GetOperationState) FWD(C_SetOperationState)
FWD_LOG(C_Logout) FWD(C_CreateObject) FWD(C_CopyObject) FWD(C_DestroyObject)
FWD(C_GetObjectSize) FWD(C_GetAttributeValue) FWD(C_SetAttributeValue)
FWD(C_FindObjects) FWD(C_FindObjectsFinal)

static CK_RV w_C_FindObjectsInit P_C_FindObjectsInit
{
    struct cfg c;
    CK_RV rv = pre_generic("C_FindObjectsInit", hSession, 0);
    if (rv != CKR_OK) return rv;
    snap(&c);
    if (c.find_delay_ms) {  /* outside mu: the other processes' and threads' calls go on */
        log_call("find-delay ms=%lu", c.find_delay_ms);
        sleep_ms(c.find_delay_ms);
    }
    return real->C_FindObjectsInit(hSession, pTemplate, ulCount);
}

FWD(C_EncryptInit) FWD(C_Encrypt) FWD(C_EncryptUpdate) FWD(C_EncryptFinal)
FWD(C_DecryptInit) FWD_LOG(C_Decrypt) FWD(C_DecryptUpdate) FWD(C_DecryptFinal)
FWD(C_DigestInit) FWD(C_Digest) FWD(C_DigestUpdate) FWD(C_DigestKey) FWD(C_DigestFinal)
FWD(C_SignUpdate) FWD(C_SignRecoverInit) FWD(C_SignRecover)
FWD(C_VerifyInit) FWD(C_Verify) FWD(C_VerifyUpdate) FWD(C_VerifyFinal)
FWD(C_VerifyRecoverInit) FWD(C_VerifyRecover)
FWD(C_DigestEncryptUpdate) FWD(C_DecryptDigestUpdate) FWD(C_SignEncryptUpdate)
FWD(C_DecryptVerifyUpdate) FWD(C_GenerateKey) FWD(C_GenerateKeyPair) FWD(C_WrapKey)
FWD(C_UnwrapKey) FWD(C_DeriveKey) FWD(C_SeedRandom) FWD(C_GenerateRandom)
FWD(C_GetFunctionStatus) FWD(C_CancelFunction)

static CK_RV w_C_SignInit P_C_SignInit
{
    struct cfg c;
    CK_RV rv = pre_generic("C_SignInit", hSession, 1);
    if (rv != CKR_OK) return rv;
    snap(&c);
    if (pMechanism && is_hidden(&c, pMechanism->mechanism)) {
        log_call("C_SignInit rv=0x%lx hidden_mechanism=0x%lx", (unsigned long)CKR_MECHANISM_INVALID,
                 (unsigned long)pMechanism->mechanism);
        return CKR_MECHANISM_INVALID;
    }
    rv = real->C_SignInit(hSession, pMechanism, hKey);
    log_call("C_SignInit rv=0x%lx", rv);
    return rv;
}

/* ------------------------------------------------------- init / events */

static CK_RV w_C_Initialize P_C_Initialize
{
    struct cfg c;
    CK_RV rv;
    snap(&c);
    if ((rv = injected(&c, "C_Initialize")) == CKR_OK) rv = real->C_Initialize(pInitArgs);
    if (rv == CKR_OK) {
        pthread_mutex_lock(&mu);
        finalizing = 0;
        nsess = 0;
        show_cached = 0;
        event_epoch = epoch;
        pthread_mutex_unlock(&mu);
    }
    log_call("C_Initialize rv=0x%lx", rv);
    return rv;
}

static CK_RV w_C_Finalize P_C_Finalize
{
    CK_RV rv;
    pthread_mutex_lock(&mu);
    finalizing = 1;
    nsess = 0;
    show_cached = 0;
    pthread_mutex_unlock(&mu);
    rv = real->C_Finalize(pReserved);
    log_call("C_Finalize rv=0x%lx", rv);
    return rv;
}

/*
 * Emulated: an event is a change of present/show_token/generation.  The
 * slot reported is 0 with show_token, else the first real slot.
 */
static CK_RV w_C_WaitForSlotEvent P_C_WaitForSlotEvent
{
    (void)pReserved;
    if (!pSlot) return CKR_ARGUMENTS_BAD;
    for (;;) {
        int event, show, fin;
        pthread_mutex_lock(&mu);
        reload_locked();
        fin = finalizing;
        event = epoch != event_epoch || epoch_events != seen_events;
        event_epoch = epoch;
        seen_events = epoch_events;
        show = cur.show[0] != 0;
        pthread_mutex_unlock(&mu);
        if (fin) return CKR_CRYPTOKI_NOT_INITIALIZED;
        if (event) {
            CK_SLOT_ID list[64];
            CK_ULONG n = 64;
            *pSlot = 0;
            if (!show && real->C_GetSlotList(CK_FALSE, list, &n) == CKR_OK && n > 0) *pSlot = list[0];
            return CKR_OK;
        }
        if (flags & CKF_DONT_BLOCK) return CKR_NO_EVENT;
        sleep_ms(10);
    }
}

/* ------------------------------------------------------------------ entry */

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST **ppFunctionList);

static void load_real(void)
{
    const char *target = getenv("FAULT_PKCS11_TARGET");
    const char *ctl = getenv("FAULT_PKCS11_CONTROL");
    CK_RV (*get_list)(CK_FUNCTION_LIST **), (*self)(CK_FUNCTION_LIST **) = C_GetFunctionList;
    void *handle, *sym;

    if (!target || !*target) target = DEFAULT_TARGET;
    if (ctl && *ctl) {
        copy_str(ctl_path, sizeof ctl_path, ctl);
        snprintf(state_path, sizeof state_path, "%s.state", ctl_path);
    }
    handle = dlopen(target, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        fprintf(stderr, "fault_pkcs11: cannot load %s: %s\n", target, dlerror());
        return;
    }
    sym = dlsym(handle, "C_GetFunctionList");
    if (sym) memcpy(&get_list, &sym, sizeof get_list);
    if (!sym || get_list == self) {
        fprintf(stderr, "fault_pkcs11: %s has no usable C_GetFunctionList\n", target);
        return;
    }
    if ((load_rv = get_list(&real)) != CKR_OK || !real) {
        if (load_rv == CKR_OK) load_rv = CKR_GENERAL_ERROR;
        return;
    }
    wrapped = *real;
#define SET_(fn) wrapped.fn = w_##fn;
    SET_(C_Initialize) SET_(C_Finalize) SET_(C_GetSlotList) SET_(C_GetSlotInfo)
    SET_(C_GetTokenInfo) SET_(C_GetMechanismList) SET_(C_GetMechanismInfo) SET_(C_InitToken)
    SET_(C_InitPIN) SET_(C_SetPIN) SET_(C_OpenSession) SET_(C_CloseSession)
    SET_(C_CloseAllSessions) SET_(C_GetSessionInfo) SET_(C_GetOperationState)
    SET_(C_SetOperationState) SET_(C_Login) SET_(C_Logout) SET_(C_CreateObject)
    SET_(C_CopyObject) SET_(C_DestroyObject) SET_(C_GetObjectSize) SET_(C_GetAttributeValue)
    SET_(C_SetAttributeValue) SET_(C_FindObjectsInit) SET_(C_FindObjects) SET_(C_FindObjectsFinal)
    SET_(C_EncryptInit) SET_(C_Encrypt) SET_(C_EncryptUpdate) SET_(C_EncryptFinal)
    SET_(C_DecryptInit) SET_(C_Decrypt) SET_(C_DecryptUpdate) SET_(C_DecryptFinal)
    SET_(C_DigestInit) SET_(C_Digest) SET_(C_DigestUpdate) SET_(C_DigestKey) SET_(C_DigestFinal)
    SET_(C_SignInit) SET_(C_Sign) SET_(C_SignUpdate) SET_(C_SignFinal) SET_(C_SignRecoverInit)
    SET_(C_SignRecover) SET_(C_VerifyInit) SET_(C_Verify) SET_(C_VerifyUpdate) SET_(C_VerifyFinal)
    SET_(C_VerifyRecoverInit) SET_(C_VerifyRecover) SET_(C_DigestEncryptUpdate)
    SET_(C_DecryptDigestUpdate) SET_(C_SignEncryptUpdate) SET_(C_DecryptVerifyUpdate)
    SET_(C_GenerateKey) SET_(C_GenerateKeyPair) SET_(C_WrapKey) SET_(C_UnwrapKey)
    SET_(C_DeriveKey) SET_(C_SeedRandom) SET_(C_GenerateRandom) SET_(C_GetFunctionStatus)
    SET_(C_CancelFunction) SET_(C_WaitForSlotEvent)
#undef SET_
    wrapped.C_GetFunctionList = C_GetFunctionList;
}

EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST **ppFunctionList)
{
    if (!ppFunctionList) return CKR_ARGUMENTS_BAD;
    pthread_once(&load_once, load_real);
    if (load_rv != CKR_OK) return load_rv;
    *ppFunctionList = &wrapped;
    return CKR_OK;
}
