/*
 * A fake libnvidia-ml.so.1: the NVML C functions that governor reaches through the real
 * nvidia-ml-py binding (pynvml), answering from a state file instead of a GPU.
 *
 * tests/support/c_nvml.py builds it and writes the state; its docstring has the format.
 * The file named by $FAKE_NVML_STATE is read again whenever it changed (inode, size or
 * mtime), one `key=value` a line:
 *
 *   init_error=DRIVER_NOT_LOADED      nvmlInit fails with this NVML return code
 *   count_error=...                   nvmlDeviceGetCount fails (a driver unloaded mid-run)
 *   set_power_error=NO_PERMISSION     nvmlDeviceSetPowerManagementLimit fails
 *   missing=fnA,fnB                   functions the "driver" lacks: FUNCTION_NOT_FOUND
 *   gpu.N.<field>=value               uuid name utilization temperature power_mw
 *                                     power_limit_mw power_default_mw power_min_mw
 *                                     power_max_mw memory_used memory_total sm_clock_mhz
 *                                     clock_events processes (pid:bytes,...) lost
 *                                     mig (MIG device UUIDs, comma-separated, in
 *                                     slot order: the GPU is in MIG mode)
 *   gpu.N.error.<function>=CODE       that function fails on that GPU
 *   gpu.N.power_limit_set_mw=value    written here by nvmlDeviceSetPowerManagementLimit
 *
 * A field a GPU lacks answers NOT_SUPPORTED. CODE is an NVML error name without
 * NVML_ERROR_ (GPU_IS_LOST) or its number. Without $FAKE_NVML_STATE nvmlInit answers
 * LIBRARY_NOT_FOUND, as on a machine without a driver. If $FAKE_NVML_LOG is set, the name
 * of every call is appended to it, one a line.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int nvmlReturn_t;
typedef struct fake_device *nvmlDevice_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_LIBRARY_NOT_FOUND = 12,
    NVML_ERROR_FUNCTION_NOT_FOUND = 13,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define NVML_TEMPERATURE_GPU 0
#define NVML_CLOCK_SM 1
#define TEMPERATURE_V1 0x100000C

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;
typedef struct { unsigned int version; int sensorType; int temperature; } nvmlTemperature_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;

static const struct { const char *name; int code; } ERRORS[] = {
    {"UNINITIALIZED", 1}, {"INVALID_ARGUMENT", 2}, {"NOT_SUPPORTED", 3},
    {"NO_PERMISSION", 4}, {"ALREADY_INITIALIZED", 5}, {"NOT_FOUND", 6},
    {"INSUFFICIENT_SIZE", 7}, {"INSUFFICIENT_POWER", 8}, {"DRIVER_NOT_LOADED", 9},
    {"TIMEOUT", 10}, {"IRQ_ISSUE", 11}, {"LIBRARY_NOT_FOUND", 12},
    {"FUNCTION_NOT_FOUND", 13}, {"CORRUPTED_INFOROM", 14}, {"GPU_IS_LOST", 15},
    {"RESET_REQUIRED", 16}, {"OPERATING_SYSTEM", 17}, {"LIB_RM_VERSION_MISMATCH", 18},
    {"IN_USE", 19}, {"MEMORY", 20}, {"NO_DATA", 21}, {"VGPU_ECC_NOT_SUPPORTED", 22},
    {"INSUFFICIENT_RESOURCES", 23}, {"FREQ_NOT_SUPPORTED", 24},
    {"ARGUMENT_VERSION_MISMATCH", 25}, {"DEPRECATED", 26}, {"NOT_READY", 27},
    {"GPU_NOT_FOUND", 28}, {"INVALID_STATE", 29}, {"UNKNOWN", 999},
};

#define MAX_GPUS 64
#define MAX_LINES 4096

#define MAX_MIG 8

struct fake_device { int index; };
static struct fake_device devices[MAX_GPUS];
/* MIG device handles: slot s of GPU g is mig_devices[g * MAX_MIG + s] */
static struct fake_device mig_devices[MAX_GPUS * MAX_MIG];

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int init_depth;
static char *text;                 /* the state file, lines split in place */
static char *keys[MAX_LINES], *values[MAX_LINES];
static int nlines;
/* An index of the keys (open addressing, FNV-1a): each call looks up a few keys, and a
 * scan of every line per lookup made a round's cost grow with the square of the GPUs
 * (the scaling bench's 64 GPUs), a cost of the fake, not of a driver. Each slot holds
 * the line of a key's last value, or -1. gpu_count is counted once a load, likewise. */
#define SLOTS (2 * MAX_LINES)
static int slots[SLOTS];
static int counted_gpus;
static struct stat seen;
static char seen_path[4096];

static int error_code(const char *value)
{
    char *end;
    long n = strtol(value, &end, 10);
    if (*value && !*end)
        return (int)n;
    for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
        if (!strcmp(ERRORS[i].name, value))
            return ERRORS[i].code;
    return NVML_ERROR_UNKNOWN;
}

static unsigned slot_of(const char *key)
{
    unsigned h = 2166136261u;
    for (const unsigned char *p = (const unsigned char *)key; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % SLOTS;
}

/* Fills the index from keys[]: a later line with the same key takes the slot over, so a
 * lookup answers the key's last value, as the file's order says. */
static void index_lines(void)
{
    memset(slots, -1, sizeof slots);
    counted_gpus = 0;
    for (int i = 0; i < nlines; i++) {
        unsigned h = slot_of(keys[i]);
        while (slots[h] >= 0 && strcmp(keys[slots[h]], keys[i]))
            h = (h + 1) % SLOTS;
        slots[h] = i;
        int index;
        if (sscanf(keys[i], "gpu.%d.", &index) == 1 && index >= counted_gpus && index < MAX_GPUS)
            counted_gpus = index + 1;
    }
}

/* Reads the state file again if it changed. Called with the lock held. */
static void load(void)
{
    const char *path = getenv("FAKE_NVML_STATE");
    struct stat st;
    if (!path || stat(path, &st) != 0) {
        free(text);
        text = NULL;
        nlines = 0;
        index_lines();
        seen_path[0] = 0;
        return;
    }
    if (text && !strcmp(path, seen_path) && st.st_ino == seen.st_ino
        && st.st_size == seen.st_size && st.st_mtim.tv_sec == seen.st_mtim.tv_sec
        && st.st_mtim.tv_nsec == seen.st_mtim.tv_nsec
        && st.st_ctim.tv_sec == seen.st_ctim.tv_sec && st.st_ctim.tv_nsec == seen.st_ctim.tv_nsec)
        return;
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char *buf = malloc((size_t)st.st_size + 1);
    size_t n = fread(buf, 1, (size_t)st.st_size, f);
    fclose(f);
    buf[n] = 0;
    free(text);
    text = buf;
    nlines = 0;
    for (char *line = strtok(buf, "\n"); line && nlines < MAX_LINES; line = strtok(NULL, "\n")) {
        char *eq = strchr(line, '=');
        if (!eq || line[0] == '#')
            continue;
        *eq = 0;
        keys[nlines] = line;
        values[nlines++] = eq + 1;
    }
    index_lines();
    seen = st;
    snprintf(seen_path, sizeof seen_path, "%s", path);
}

/* The last value of a key, or NULL. */
static const char *get(const char *key)
{
    if (nlines == 0)  /* no state read yet: the index is not filled */
        return NULL;
    for (unsigned h = slot_of(key); slots[h] >= 0; h = (h + 1) % SLOTS)
        if (!strcmp(keys[slots[h]], key))
            return values[slots[h]];
    return NULL;
}

static const char *gpu_get(int index, const char *field)
{
    char key[256];
    snprintf(key, sizeof key, "gpu.%d.%s", index, field);
    return get(key);
}

/* The state marks the GPU lost (any value but "" or "0"). */
static int gpu_lost(int index)
{
    const char *lost = gpu_get(index, "lost");
    return lost && strcmp(lost, "0") && strcmp(lost, "");
}

static int gpu_count(void)
{
    return counted_gpus;
}

static void log_call(const char *name)
{
    const char *path = getenv("FAKE_NVML_LOG");
    if (!path)
        return;
    FILE *f = fopen(path, "a");
    if (f) {
        fprintf(f, "%s\n", name);
        fclose(f);
    }
}

static int missing(const char *name)
{
    const char *list = get("missing");
    size_t len = strlen(name);
    for (const char *p = list; p && *p;) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (n == len && !strncmp(p, name, len))
            return 1;
        p = end ? end + 1 : NULL;
    }
    return 0;
}

/* Every call starts here: log it, reload the state, answer what the state says it fails
 * with. Returns with the lock held when it returns NVML_SUCCESS. */
static nvmlReturn_t enter(const char *name, nvmlDevice_t device, int *index)
{
    pthread_mutex_lock(&lock);
    log_call(name);
    load();
    nvmlReturn_t ret = NVML_SUCCESS;
    if (missing(name))
        ret = NVML_ERROR_FUNCTION_NOT_FOUND;
    else if (init_depth == 0)
        ret = NVML_ERROR_UNINITIALIZED;
    else if (device) {
        if (device < devices || device >= devices + MAX_GPUS)
            ret = NVML_ERROR_INVALID_ARGUMENT;
        else {
            *index = (int)(device - devices);
            char key[256];
            snprintf(key, sizeof key, "error.%s", name);
            const char *failure = gpu_get(*index, key);
            if (*index >= gpu_count() || gpu_lost(*index))
                ret = NVML_ERROR_GPU_IS_LOST;
            else if (failure)
                ret = error_code(failure);
        }
    }
    if (ret != NVML_SUCCESS)
        pthread_mutex_unlock(&lock);
    return ret;
}

static nvmlReturn_t leave(nvmlReturn_t ret)
{
    pthread_mutex_unlock(&lock);
    return ret;
}

/* A numeric field of a GPU; NOT_SUPPORTED when the GPU lacks it. */
static nvmlReturn_t number(int index, const char *field, unsigned long long *out)
{
    const char *value = gpu_get(index, field);
    if (!value || !*value)
        return NVML_ERROR_NOT_SUPPORTED;
    *out = strtoull(value, NULL, 0);
    return NVML_SUCCESS;
}

static nvmlReturn_t uint_field(const char *fn, nvmlDevice_t device, const char *field,
                               unsigned int *out)
{
    int index;
    unsigned long long value;
    nvmlReturn_t ret = enter(fn, device, &index);
    if (ret)
        return ret;
    if (!out)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    ret = number(index, field, &value);
    if (!ret)
        *out = (unsigned int)value;
    return leave(ret);
}

static nvmlReturn_t string_field(const char *fn, nvmlDevice_t device, const char *field,
                                 char *out, unsigned int length)
{
    int index;
    nvmlReturn_t ret = enter(fn, device, &index);
    if (ret)
        return ret;
    const char *value = gpu_get(index, field);
    if (!out)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (!value)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    if (strlen(value) + 1 > length)
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    strcpy(out, value);
    return leave(NVML_SUCCESS);
}

/* ---- init and shutdown ---- */

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&lock);
    log_call("nvmlInit");
    load();
    nvmlReturn_t ret = NVML_SUCCESS;
    if (!text)
        ret = NVML_ERROR_LIBRARY_NOT_FOUND;
    else if (missing("nvmlInit"))
        ret = NVML_ERROR_FUNCTION_NOT_FOUND;
    else if (get("init_error") && *get("init_error"))
        ret = error_code(get("init_error"));
    else
        init_depth++;
    return leave(ret);
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    int index;
    nvmlReturn_t ret = enter("nvmlShutdown", NULL, &index);
    if (ret)
        return ret;
    init_depth--;
    return leave(NVML_SUCCESS);
}

EXPORT const char *nvmlErrorString(nvmlReturn_t result)
{
    if (result == NVML_SUCCESS)
        return "Success";
    for (size_t i = 0; i < sizeof ERRORS / sizeof ERRORS[0]; i++)
        if (ERRORS[i].code == result) {
            if (result == NVML_ERROR_ARGUMENT_VERSION_MISMATCH)
                return "Argument version mismatch";
            if (result == 21)
                return "No data";
            if (result == 28)
                return "GPU not found";
            return ERRORS[i].name;
        }
    return "Unknown Error";
}

/* Test hooks, not NVML: the init depth, and a clean start for the next test. */
EXPORT int fake_nvml_init_depth(void) { return init_depth; }
EXPORT void fake_nvml_reset(void)
{
    pthread_mutex_lock(&lock);
    init_depth = 0;
    free(text);
    text = NULL;
    nlines = 0;
    pthread_mutex_unlock(&lock);
}

/* ---- system and devices ---- */

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    int index;
    nvmlReturn_t ret = enter("nvmlSystemGetDriverVersion", NULL, &index);
    if (ret)
        return ret;
    const char *value = get("driver_version");
    snprintf(version, length, "%s", value ? value : "580.159.04");
    return leave(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    int index;
    nvmlReturn_t ret = enter("nvmlDeviceGetCount", NULL, &index);
    if (ret)
        return ret;
    const char *failure = get("count_error");
    if (failure && *failure)
        return leave(error_code(failure));
    *count = (unsigned int)gpu_count();
    return leave(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device)
{
    int unused;
    nvmlReturn_t ret = enter("nvmlDeviceGetHandleByIndex", NULL, &unused);
    if (ret)
        return ret;
    if (index >= MAX_GPUS || (int)index >= gpu_count())
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (gpu_lost((int)index))
        return leave(NVML_ERROR_GPU_IS_LOST);
    *device = &devices[index];
    return leave(NVML_SUCCESS);
}

/* The UUID of MIG slot `slot` of GPU `index` (gpu.N.mig), copied into out; 0 if none. */
static int mig_uuid(int index, int slot, char *out, size_t size)
{
    const char *p = gpu_get(index, "mig");
    for (int at = 0; p && *p; at++) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        if (at == slot) {
            if (n == 0 || n + 1 > size)
                return 0;
            memcpy(out, p, n);
            out[n] = 0;
            return 1;
        }
        p = end ? end + 1 : NULL;
    }
    return 0;
}

static int is_mig_handle(nvmlDevice_t device)
{
    return device >= mig_devices && device < mig_devices + MAX_GPUS * MAX_MIG;
}

/* NVML (R470 on) finds a MIG device by its "MIG-..." UUID as well, and answers a MIG
 * device handle. */
EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, nvmlDevice_t *device)
{
    int unused;
    nvmlReturn_t ret = enter("nvmlDeviceGetHandleByUUID", NULL, &unused);
    if (ret)
        return ret;
    if (!uuid || !device)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    int count = gpu_count();
    for (int i = 0; i < count; i++) {
        const char *value = gpu_get(i, "uuid");
        if (value && !strcmp(value, uuid)) {
            *device = &devices[i];
            return leave(NVML_SUCCESS);
        }
    }
    char mig[96];
    for (int i = 0; i < count; i++)
        for (int slot = 0; slot < MAX_MIG; slot++)
            if (mig_uuid(i, slot, mig, sizeof mig) && !strcmp(mig, uuid)) {
                *device = &mig_devices[i * MAX_MIG + slot];
                return leave(NVML_SUCCESS);
            }
    return leave(NVML_ERROR_NOT_FOUND);
}

/* The parent GPU of a MIG device handle; INVALID_ARGUMENT for any other handle. */
EXPORT nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(nvmlDevice_t mig,
                                                                 nvmlDevice_t *device)
{
    int unused;
    nvmlReturn_t ret = enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", NULL, &unused);
    if (ret)
        return ret;
    if (!device || !is_mig_handle(mig))
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    int parent = (int)(mig - mig_devices) / MAX_MIG, slot = (int)(mig - mig_devices) % MAX_MIG;
    char uuid[96];
    if (parent >= gpu_count() || !mig_uuid(parent, slot, uuid, sizeof uuid))
        return leave(NVML_ERROR_INVALID_ARGUMENT);  /* the MIG device was destroyed */
    if (gpu_lost(parent))
        return leave(NVML_ERROR_GPU_IS_LOST);
    *device = &devices[parent];
    return leave(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(nvmlDevice_t device, unsigned int *is_mig)
{
    int unused;
    nvmlReturn_t ret = enter("nvmlDeviceIsMigDeviceHandle", NULL, &unused);
    if (ret)
        return ret;
    if (!is_mig)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (is_mig_handle(device))
        *is_mig = 1;
    else if (device >= devices && device < devices + MAX_GPUS)
        *is_mig = 0;
    else
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    return leave(NVML_SUCCESS);
}

/* NVML's index of a GPU handle; a MIG device handle is not a GPU's: INVALID_ARGUMENT. */
EXPORT nvmlReturn_t nvmlDeviceGetIndex(nvmlDevice_t device, unsigned int *out)
{
    int index;
    nvmlReturn_t ret = enter("nvmlDeviceGetIndex", device, &index);
    if (ret)
        return ret;
    if (!out)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    *out = (unsigned int)index;
    return leave(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length)
{
    return string_field("nvmlDeviceGetName", device, "name", name, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length)
{
    return string_field("nvmlDeviceGetUUID", device, "uuid", uuid, length);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(nvmlDevice_t device, nvmlUtilization_t *util)
{
    int index;
    unsigned long long gpu, memory = 0;
    nvmlReturn_t ret = enter("nvmlDeviceGetUtilizationRates", device, &index);
    if (ret)
        return ret;
    ret = number(index, "utilization", &gpu);
    if (ret)
        return leave(ret);
    number(index, "memory_utilization", &memory);
    util->gpu = (unsigned int)gpu;
    util->memory = (unsigned int)memory;
    return leave(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(nvmlDevice_t device, nvmlTemperature_t *temp)
{
    int index;
    unsigned long long value;
    nvmlReturn_t ret = enter("nvmlDeviceGetTemperatureV", device, &index);
    if (ret)
        return ret;
    if (!temp)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (temp->version != TEMPERATURE_V1)
        return leave(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (temp->sensorType != NVML_TEMPERATURE_GPU)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    ret = number(index, "temperature", &value);
    if (!ret)
        temp->temperature = (int)value;
    return leave(ret);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(nvmlDevice_t device, int sensor, unsigned int *temp)
{
    if (sensor != NVML_TEMPERATURE_GPU)
        return NVML_ERROR_INVALID_ARGUMENT;
    return uint_field("nvmlDeviceGetTemperature", device, "temperature", temp);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(nvmlDevice_t device, unsigned int *power)
{
    return uint_field("nvmlDeviceGetPowerUsage", device, "power_mw", power);
}

/* The limit in force: one set through nvmlDeviceSetPowerManagementLimit, else the state's. */
static nvmlReturn_t power_limit(const char *fn, nvmlDevice_t device, unsigned int *limit)
{
    int index;
    unsigned long long value;
    nvmlReturn_t ret = enter(fn, device, &index);
    if (ret)
        return ret;
    ret = number(index, "power_limit_set_mw", &value);
    if (ret)
        ret = number(index, "power_limit_mw", &value);
    if (!ret)
        *limit = (unsigned int)value;
    return leave(ret);
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit("nvmlDeviceGetEnforcedPowerLimit", device, limit);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(nvmlDevice_t device, unsigned int *limit)
{
    return power_limit("nvmlDeviceGetPowerManagementLimit", device, limit);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(nvmlDevice_t device,
                                                            unsigned int *limit)
{
    return uint_field("nvmlDeviceGetPowerManagementDefaultLimit", device, "power_default_mw",
                      limit);
}

/* Two of GPU `index`'s numbers: the first error, if either is missing. */
static nvmlReturn_t two_numbers(int index, const char *a, unsigned long long *x,
                                const char *b, unsigned long long *y)
{
    nvmlReturn_t ret = number(index, a, x);
    return ret ? ret : number(index, b, y);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(
    nvmlDevice_t device, unsigned int *low, unsigned int *high)
{
    int index;
    unsigned long long min, max;
    nvmlReturn_t ret = enter("nvmlDeviceGetPowerManagementLimitConstraints", device, &index);
    if (ret)
        return ret;
    ret = two_numbers(index, "power_min_mw", &min, "power_max_mw", &max);
    if (!ret) {
        *low = (unsigned int)min;
        *high = (unsigned int)max;
    }
    return leave(ret);
}

/* Writes `gpu.N.power_limit_set_mw=limit` into the state file (atomically, by rename). */
static nvmlReturn_t write_limit(int index, unsigned int limit)
{
    const char *path = getenv("FAKE_NVML_STATE");
    char key[64], tmp[4200];
    snprintf(key, sizeof key, "gpu.%d.power_limit_set_mw", index);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *in = fopen(path, "r"), *out = fopen(tmp, "w");
    if (!in || !out) {
        if (in)
            fclose(in);
        if (out)
            fclose(out);
        return NVML_ERROR_UNKNOWN;
    }
    char line[8192];
    size_t klen = strlen(key);
    while (fgets(line, sizeof line, in))
        if (strncmp(line, key, klen) || line[klen] != '=')
            fputs(line, out);
    fprintf(out, "%s=%u\n", key, limit);
    fclose(in);
    if (fclose(out) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return NVML_ERROR_UNKNOWN;
    }
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceSetPowerManagementLimit(nvmlDevice_t device, unsigned int limit)
{
    int index;
    unsigned long long min, max;
    nvmlReturn_t ret = enter("nvmlDeviceSetPowerManagementLimit", device, &index);
    if (ret)
        return ret;
    const char *failure = get("set_power_error");
    if (failure && *failure)
        return leave(error_code(failure));
    if (two_numbers(index, "power_min_mw", &min, "power_max_mw", &max))
        return leave(NVML_ERROR_NOT_SUPPORTED);
    if (limit < min || limit > max)
        return leave(NVML_ERROR_INVALID_ARGUMENT);
    ret = write_limit(index, limit);
    load();
    return leave(ret);
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory)
{
    int index;
    unsigned long long used, total;
    nvmlReturn_t ret = enter("nvmlDeviceGetMemoryInfo", device, &index);
    if (ret)
        return ret;
    ret = two_numbers(index, "memory_used", &used, "memory_total", &total);
    if (!ret) {
        memory->used = used;
        memory->total = total;
        memory->free = total > used ? total - used : 0;
    }
    return leave(ret);
}

EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(nvmlDevice_t device, int type, unsigned int *clock)
{
    if (type != NVML_CLOCK_SM)
        return NVML_ERROR_NOT_SUPPORTED;
    return uint_field("nvmlDeviceGetClockInfo", device, "sm_clock_mhz", clock);
}

static nvmlReturn_t reasons(const char *fn, nvmlDevice_t device, unsigned long long *out)
{
    int index;
    nvmlReturn_t ret = enter(fn, device, &index);
    if (ret)
        return ret;
    return leave(number(index, "clock_events", out));
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t device,
                                                          unsigned long long *out)
{
    return reasons("nvmlDeviceGetCurrentClocksEventReasons", device, out);
}

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t device,
                                                             unsigned long long *out)
{
    return reasons("nvmlDeviceGetCurrentClocksThrottleReasons", device, out);
}

/* `processes=pid:bytes,pid:bytes`; asked with too small an array, answers
 * INSUFFICIENT_SIZE and the count, as the driver does. */
static nvmlReturn_t processes(const char *fn, nvmlDevice_t device, unsigned int *count,
                              nvmlProcessInfo_t *infos)
{
    int index;
    nvmlReturn_t ret = enter(fn, device, &index);
    if (ret)
        return ret;
    const char *list = gpu_get(index, "processes");
    if (!list)
        return leave(NVML_ERROR_NOT_SUPPORTED);
    unsigned int n = 0;
    nvmlProcessInfo_t found[1024];
    for (const char *p = list; *p && n < 1024;) {
        char *end;
        unsigned long pid = strtoul(p, &end, 10);
        if (end == p)
            break;
        unsigned long long used = 0;
        if (*end == ':')
            used = strtoull(end + 1, &end, 10);
        found[n].pid = (unsigned int)pid;
        found[n].usedGpuMemory = used;
        found[n].gpuInstanceId = 0xFFFFFFFF;
        found[n].computeInstanceId = 0xFFFFFFFF;
        n++;
        p = *end == ',' ? end + 1 : end;
    }
    if (*count < n) {
        *count = n;
        return leave(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    *count = n;
    if (n)
        memcpy(infos, found, n * sizeof found[0]);
    return leave(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_t *infos)
{
    return processes("nvmlDeviceGetComputeRunningProcesses", device, count, infos);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t device,
                                                            unsigned int *count,
                                                            nvmlProcessInfo_t *infos)
{
    return processes("nvmlDeviceGetComputeRunningProcesses_v2", device, count, infos);
}
