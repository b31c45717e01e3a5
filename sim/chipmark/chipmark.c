// chipmark: the chip-time model's hooks (pilehost/chipmodel.py), built into a variant of the
// unix port only (pilehost/chipbuild.py), never into a pile's image. callgrind names two plain
// C functions on its command line:
//   --toggle-collect=chipmark_hw_call  what runs inside it is not counted: the simulated
//                                      hardware, which on the chip is C (GPIO, ADC, UART, lwIP,
//                                      LittleFS) or not the CPU's work at all;
//   --dump-before=chipmark_mark_point  chipmark.mark() cuts the counts: one dump per call,
//                                      i.e. per control-loop iteration.
// chipmark.hw(f, *args) calls f inside chipmark_hw_call; chipmark.excluded(f) is a callable
// that does the same and, as a class attribute, binds self like a native method: the firmware's
// pin.value() then costs what a native call costs, as on the chip, not an extra Python frame.
#include "py/runtime.h"

// callgrind toggles on every entry and exit of chipmark_hw_call: a nested call would switch
// counting back on, so only the outermost goes through it.
static int chipmark_depth;

__attribute__((noinline)) mp_obj_t chipmark_hw_call(mp_obj_t fun, size_t n_args, size_t n_kw,
    const mp_obj_t *args) {
    return mp_call_function_n_kw(fun, n_args, n_kw, args);
}

static mp_obj_t chipmark_call(mp_obj_t fun, size_t n_args, size_t n_kw, const mp_obj_t *args) {
    if (chipmark_depth) {
        return mp_call_function_n_kw(fun, n_args, n_kw, args);
    }
    chipmark_depth++;
    nlr_buf_t nlr;
    if (nlr_push(&nlr) == 0) {
        mp_obj_t ret = chipmark_hw_call(fun, n_args, n_kw, args);
        nlr_pop();
        chipmark_depth--;
        return ret;
    }
    chipmark_depth--;
    nlr_jump(nlr.ret_val);
}

static mp_obj_t chipmark_hw(size_t n_args, const mp_obj_t *args) {
    return chipmark_call(args[0], n_args - 1, 0, args + 1);
}
static MP_DEFINE_CONST_FUN_OBJ_VAR(chipmark_hw_obj, 1, chipmark_hw);

typedef struct {
    mp_obj_base_t base;
    mp_obj_t fun;
} chipmark_excluded_t;

static mp_obj_t chipmark_excluded_make_new(const mp_obj_type_t *type, size_t n_args, size_t n_kw,
    const mp_obj_t *args) {
    mp_arg_check_num(n_args, n_kw, 1, 1, false);
    chipmark_excluded_t *self = mp_obj_malloc(chipmark_excluded_t, type);
    self->fun = args[0];
    return MP_OBJ_FROM_PTR(self);
}

static mp_obj_t chipmark_excluded_call(mp_obj_t self_in, size_t n_args, size_t n_kw,
    const mp_obj_t *args) {
    chipmark_excluded_t *self = MP_OBJ_TO_PTR(self_in);
    return chipmark_call(self->fun, n_args, n_kw, args);
}

static MP_DEFINE_CONST_OBJ_TYPE(
    chipmark_excluded_type,
    MP_QSTR_excluded,
    MP_TYPE_FLAG_BINDS_SELF,
    make_new, chipmark_excluded_make_new,
    call, chipmark_excluded_call
    );

volatile unsigned int chipmark_marks;

__attribute__((noinline)) void chipmark_mark_point(void) {
    chipmark_marks++;
}

static mp_obj_t chipmark_mark(void) {
    chipmark_mark_point();
    return mp_const_none;
}
static MP_DEFINE_CONST_FUN_OBJ_0(chipmark_mark_obj, chipmark_mark);

static const mp_rom_map_elem_t chipmark_globals_table[] = {
    { MP_ROM_QSTR(MP_QSTR___name__), MP_ROM_QSTR(MP_QSTR_chipmark) },
    { MP_ROM_QSTR(MP_QSTR_hw), MP_ROM_PTR(&chipmark_hw_obj) },
    { MP_ROM_QSTR(MP_QSTR_excluded), MP_ROM_PTR(&chipmark_excluded_type) },
    { MP_ROM_QSTR(MP_QSTR_mark), MP_ROM_PTR(&chipmark_mark_obj) },
};
static MP_DEFINE_CONST_DICT(chipmark_globals, chipmark_globals_table);

const mp_obj_module_t chipmark_user_cmodule = {
    .base = { &mp_type_module },
    .globals = (mp_obj_dict_t *)&chipmark_globals,
};

MP_REGISTER_MODULE(MP_QSTR_chipmark, chipmark_user_cmodule);
